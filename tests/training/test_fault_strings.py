"""MEGAMOBI_FAULTS strings: every kind parses; every mistake is refused naming the wrong part, and through
the real command line with exit status 2, one line, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_yaml import write_run_yaml
from training_runs import make_run

from megamobi.training.faults import Fault, FaultError, check_faults_for_run, parse_faults, warning_line

REPO = Path(__file__).resolve().parents[2]


def test_every_kind_parses_and_the_warning_names_each():
    faults = parse_faults("hang:step=3:rank=1; slow:rank=0:ms=250 ;nan:step=5:rank=1;poison:step=2:rank=0;"
                          "spike:step=7:rank=0:x=50;flip:step=4:rank=1;kill:step=6:rank=1:during=save;kill:step=9:rank=0;")
    assert faults == [Fault("hang", rank=1, step=3), Fault("slow", rank=0, ms=250.0), Fault("nan", rank=1, step=5),
                      Fault("poison", rank=0, step=2), Fault("spike", rank=0, step=7, x=50.0),
                      Fault("flip", rank=1, step=4), Fault("kill", rank=1, step=6, during="save"),
                      Fault("kill", rank=0, step=9)]
    line = warning_line(faults)
    assert line.count("\n") == 0 and "8 fault(s)" in line
    for text in ("hang at step 3 on rank 1", "slow 250 ms every step on rank 0", "nan at step 5 on rank 1",
                 "poison at step 2 on rank 0", "spike x50 at step 7 on rank 0", "flip at step 4 on rank 1",
                 "kill during the save after step 6 on rank 1", "kill at step 9 on rank 0"):
        assert text in line
    assert parse_faults("") == [] and parse_faults(None) == [] and parse_faults(" ; ") == []


@pytest.mark.parametrize("text, named", [
    ("melt:step=1:rank=0", "unknown fault kind 'melt'"),
    ("hang:step=3", "hang needs rank="),
    ("spike:step=3:rank=0", "spike needs x="),
    ("hang:step=3:rank=0:ms=5", "hang takes no 'ms'"),
    ("hang:step3:rank=0", "'step3' is not key=value"),
    ("hang:step=:rank=0", "'step=' is not key=value"),
    ("hang:step=three:rank=0", "step='three' is not a whole number"),
    ("hang:step=2.5:rank=0", "step='2.5' is not a whole number"),
    ("hang:step=0:rank=0", "step=0: steps count from 1"),
    ("hang:step=-1:rank=0", "step=-1: steps count from 1"),
    ("nan:step=1:rank=-1", "rank=-1: ranks count from 0"),
    ("slow:rank=0:ms=0", "ms=0 must be positive"),
    ("slow:rank=0:ms=-5", "ms=-5 must be positive"),
    ("slow:rank=0:ms=fast", "ms='fast' is not a number"),
    ("spike:step=1:rank=0:x=inf", "x='inf' must be finite"),
    ("kill:step=1:rank=0:during=load", "during='load': the only choice is during=save"),
    ("nan:step=1:rank=0:step=2", "step is given twice"),
    ("nan:step=1:rank=0;hang:rank=1", "'hang:rank=1': hang needs step="),
])
def test_a_bad_string_names_the_wrong_part(text, named):
    with pytest.raises(FaultError, match="MEGAMOBI_FAULTS") as err:
        parse_faults(text)
    assert named in str(err.value)


def test_a_fault_the_run_never_meets_is_refused():
    with pytest.raises(FaultError, match="rank=2, but the run has 2 rank"):
        check_faults_for_run(parse_faults("nan:step=1:rank=2"), world_size=2, total_steps=6)
    with pytest.raises(FaultError, match="step=7, but the run has 6 steps"):
        check_faults_for_run(parse_faults("flip:step=7:rank=0"), world_size=2, total_steps=6)
    check_faults_for_run(parse_faults("slow:rank=1:ms=5;kill:step=6:rank=0"), world_size=2, total_steps=6)


def test_the_real_command_line_exits_2_naming_the_part(tmp_path, token_shards):
    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "run", token_shards))
    for faults, named in (("hang:step=3:rank=1:when=now", "hang takes no 'when'"),
                          ("nan:step=2:rank=5", "rank=5, but the run has 2 rank(s)")):
        out = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(run_yaml)],
                             cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "MEGAMOBI_FAULTS": faults, "WORLD_SIZE": "2"})
        assert out.returncode == 2, out.stderr
        assert named in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
