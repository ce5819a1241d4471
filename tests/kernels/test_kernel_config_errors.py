"""Every key this work added, given a bad value, stops `python -m megamobi.pretrain --check-only` with
exit status 2 and ONE line naming the file and the key (and what to do), never a traceback."""

import subprocess
import sys

import pytest
from run_yaml import write_run_yaml
from training_runs import make_run

from megamobi.pretrain import main as pretrain_main

BAD_VALUES = [
    (["train.kernels=fast"], "train.kernels must be one of auto, plain, got 'fast'"),
    (["train.kernels=1"], "train.kernels: expected a string, got 1"),
    (["train.kernels=null"], "train.kernels: expected a string, got None"),
    (["train.compile=maybe"], "train.compile: expected true or false, got 'maybe'"),
    (["train.compile=1"], "train.compile: expected true or false, got 1"),
    (["train.compile_backend=tvm"], "train.compile_backend must be one of inductor, aot_eager, got 'tvm'"),
    (["train.compile_backend=0"], "train.compile_backend: expected a string, got 0"),
    (["train.compile=true", "parallel.zero_stage=3"], "train.compile with parallel.tensor = 1, pipeline = 1, zero_stage = 3"),
    (["model.activation_checkpointing=partial"], "activation_checkpointing must be one of none, full, selective (or true / false), got 'partial'"),
    (["model.activation_checkpointing=0"], "activation_checkpointing must be one of none, full, selective (or true / false), got 0"),
    (["model.activation_checkpointing=[full]"], "activation_checkpointing must be one of none, full, selective (or true / false), got ['full']"),
]


@pytest.fixture
def run_yaml(tmp_path, token_shards):
    return write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards))


@pytest.mark.parametrize("overrides, message", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_bad_value_is_one_line_with_exit_2(overrides, message, run_yaml, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pretrain_main(["--check-only", "--config", str(run_yaml), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megamobi: error: ") and str(run_yaml) in err, err
    assert message in err, err


def test_good_values_pass(run_yaml, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    for overrides in (["train.kernels=plain"], ["train.compile=true", "train.compile_backend=aot_eager"],
                      ["model.activation_checkpointing=selective", "parallel.zero_stage=2", "train.compile=true"],
                      ["model.activation_checkpointing=true"]):
        assert pretrain_main(["--check-only", "--config", str(run_yaml), *overrides]) == 0, capsys.readouterr().err


def test_compile_with_tensor_parallel_through_the_real_command(run_yaml, repo_root):
    proc = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(run_yaml),
                           "train.compile=true", "parallel.tensor=2"], cwd=repo_root, capture_output=True, text=True,
                          env={**__import__("os").environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.compile with parallel.tensor = 2" in lines[0] and "set train.compile: false" in lines[0]
