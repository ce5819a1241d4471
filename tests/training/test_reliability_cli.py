"""Every MEGAMOBI_FAULTS kind through the real CLI (`bash launch/pretrain.sh`, 2 CPU ranks), asserting what a
user would check (docs/reliability.md takes its measured numbers from these runs; `-s` prints them):

- nan + spike + flip + slow in one run with train.divergence.action: rewind: three rewinds, each verdict
  "transient" naming the rank, the straggler named in the log and metrics.jsonl, and the run's losses
  equal an uninterrupted run's bit for bit;
- poison + kill during a save: the re-run reproduces the NaN, the step's samples are skipped and
  recorded, the killed save leaves the previous checkpoint intact; the same command resumes bitwise
  (against an uninterrupted poisoned run) and megamobi.replay shows exactly those samples as skipped;
- hang: the watchdog ends the job within hang_timeout_s + 60 s with exit status 76, naming rank 1,
  with both ranks' stacks in RUN_DIR/logs/;
- SIGSTOP of a rank, then SIGTERM to the job: it ends within stop_grace_s (+ the watchdog's interval),
  saying no save was possible and naming the stopped rank.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import make_run, read_metrics

from megamobi.checkpointing.manifest import verify_checkpoint
from megamobi.exit_codes import HUNG
from megamobi.training.events import read_events

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
STEPS = 8
EVERY_2_STEPS = {"interval_tokens": 2 * 8 * 32}  # the test runs' 8 sequences x 32 tokens a step
REWIND = {"steps": STEPS, "seed": 11, "log_interval": 1, "consistency_check_interval": 2,
          "divergence": {"action": "rewind", "spike_factor": 3.0, "window": 2, "max_rewinds": 4}}


def _env(faults: str = "", **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    env.update(PYTHON=sys.executable, PATH=f"{VENV_BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), **extra)
    if faults:
        env["MEGAMOBI_FAULTS"] = faults
    return env


def _launch(run_yaml: Path, faults: str = "", **extra) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml)], cwd=run_yaml.parent,
                            env=_env(faults, **extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    return proc.communicate(timeout=timeout)[0]


def _losses(run_dir: Path) -> list:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def _train_with_faults(rank, run, faults):
    from megamobi.training.loop import Trainer

    os.environ["MEGAMOBI_FAULTS"] = faults  # this forked rank only
    Trainer(run).train()
    return _losses(Path(run.run_dir)) if rank == 0 else None


def _reference(tmp_path: Path, token_shards: Path, name: str, faults: str = "", **sections) -> list:
    """The same run, uninterrupted, through the fork harness (2 ranks, the same layout: bitwise equal)."""
    run = make_run(tmp_path / name, token_shards, **sections)
    return run_ranks(_train_with_faults, world_size=2, args=(run, faults))[0]


def _events(run_dir: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run_dir) if e["kind"] == kind]


def test_transient_faults_rewind_rerun_and_match_an_uninterrupted_run(tmp_path, token_shards):
    sections = dict(train=REWIND, checkpoint=EVERY_2_STEPS)
    run_dir = tmp_path / "faulty"
    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_run(run_dir, token_shards, **sections))
    faults = "nan:step=3:rank=1;flip:step=4:rank=1;spike:step=7:rank=0:x=50;slow:rank=1:ms=300"
    output = _finish(_launch(run_yaml, faults))
    assert "Traceback" not in output, output[-4000:]
    warnings = [line for line in output.splitlines() if "MEGAMOBI_FAULTS injects 4 fault(s)" in line]
    assert len(warnings) == 1 and all(f in warnings[0] for f in ("nan at step 3 on rank 1", "flip at step 4 on rank 1",
                                                                   "spike x50 at step 7 on rank 0", "slow 300 ms"))
    reference = _reference(tmp_path, token_shards, "reference", **sections)
    assert _losses(run_dir) == reference  # bit for bit, after three rewinds
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, STEPS + 1))

    # nan at step 3: rewind to step 2, the re-run is clean: transient, on rank 1.
    first, verdicts = _events(run_dir, "non_finite"), _events(run_dir, "transient")
    assert [(e["step"], e["ranks"], e["action"]) for e in first] == [(3, [1], "rewind to step_0000002")]
    assert [(e["step"], e["ranks"]) for e in verdicts] == [(3, [1]), (4, [1]), (7, [0])]
    # flip after step 4's update on rank 1: the check at step 4 sees two copies disagree (no majority),
    # no checkpoint is written, and the re-run names the copy that changed.
    [mismatch] = _events(run_dir, "replica_mismatch")
    assert mismatch["step"] == 4 and mismatch["ranks"] == [0, 1] and not mismatch["majority"]
    assert mismatch["action"] == "rewind to step_0000002" and mismatch["tensors"]
    # spike x50 at step 7 on rank 0: above 3 x the median of the last two losses; rewind to step 6.
    [spike] = _events(run_dir, "spike")
    assert (spike["step"], spike["ranks"], spike["action"]) == (7, [0], "rewind to step_0000006")
    assert not _events(run_dir, "rerun_mismatch")  # every re-run repeated the first pass bit for bit
    assert all(e["hosts"] == [os.uname().nodename] * len(e["ranks"]) for e in read_events(run_dir))
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == [f"step_{s:07d}" for s in (2, 4, 6, 8)]
    assert all(verify_checkpoint(c) == [] for c in checkpoints)

    # The slow rank is named with its host, in the log and in metrics.jsonl; the fast one never.
    named = [s for m in read_metrics(run_dir) for s in m.get("stragglers", [])]
    assert named and {s["rank"] for s in named} == {1} and all(s["ratio"] > 1.3 for s in named)
    assert all(s["host"] == os.uname().nodename for s in named)
    assert "stragglers at step" in output and "rank 1 (" in output
    print(f"\nmeasured: straggler ratios {sorted(s['ratio'] for s in named)}")


def _replay(run_dir: Path, *args) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "megamobi.replay", str(run_dir), *args, "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_bad_data_is_skipped_recorded_replayed_and_resumed_bitwise(tmp_path, token_shards):
    sections = dict(train=REWIND, checkpoint=EVERY_2_STEPS)
    run_dir = tmp_path / "poisoned"
    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_run(run_dir, token_shards, **sections))
    proc = _launch(run_yaml, "poison:step=3:rank=0;kill:step=6:rank=0:during=save")
    output = _finish(proc)
    # The kill during step 6's save: exit 137, the save left as .partial, step 4 intact and `latest`.
    assert proc.returncode == 128 + signal.SIGKILL, output[-4000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".step_0000006.partial").is_dir() and not (checkpoints / "step_0000006").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_0000004"
    assert verify_checkpoint(checkpoints / "step_0000004") == []
    # The poisoned step: NaN, rewind, NaN again -> bad data; its samples are skipped and listed.
    [first] = _events(run_dir, "non_finite")
    assert (first["step"], first["ranks"], first["action"]) == (3, [0], "rewind to step_0000002")
    [verdict] = _events(run_dir, "data")
    assert verdict["step"] == 3 and verdict["ranks"] == [0] and verdict["action"] == "skipped the step's samples"
    assert len(verdict["samples"]) == 8  # all ranks' micro-batches: the global batch

    # The same command again (the data is still bad): resumes from step 4 and finishes.
    proc = _launch(run_yaml, "poison:step=3:rank=0")
    output = _finish(proc)
    assert proc.returncode == 0, output[-4000:]
    reference = _reference(tmp_path, token_shards, "reference", faults="poison:step=3:rank=0", **sections)
    assert _losses(run_dir) == reference  # bitwise after the skip, the kill and the resume
    assert _losses(run_dir)[2] is None  # step 3's NaN, logged as null
    assert [m["skipped_steps"] for m in read_metrics(run_dir) if "loss" in m] == [0, 0, 1, 1, 1, 1, 1, 1]

    # Replay lists step 3's samples as skipped: exactly those of the event; --mix does not count them.
    listed = _replay(run_dir, "--steps", "2:4")
    skipped = [s for s in listed if s["skipped"]]
    assert {s["step"] for s in skipped} == {3} and len(skipped) == 8
    assert all(not s["skipped"] for s in listed if s["step"] != 3)
    key = ("rank", "micro_batch", "shard", "row", "offset")
    assert sorted(tuple(str(s[k]) for k in key) for s in skipped) == sorted(
        tuple(str(s[k]) for k in key) for s in verdict["samples"])
    [mix] = _replay(run_dir, "--mix", f"1:{STEPS}")
    assert mix["tokens"] == (STEPS - 1) * 8 * 32


@pytest.fixture
def hang_run(tmp_path, token_shards):
    def make(**launch):
        run_dir = tmp_path / "hung"
        run = make_run(run_dir, token_shards, train={"steps": 1000, "seed": 11, "log_interval": 1},
                       checkpoint=EVERY_2_STEPS, launch=launch)
        return run_dir, write_run_yaml(tmp_path / "run.yaml", run)

    return make


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, _finish(proc)[-4000:]
        assert time.monotonic() < deadline, "the run never reached the step"
        try:
            if any(m.get("step", 0) >= step for m in read_metrics(run_dir)):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.1)


def _hang_dir(run_dir: Path) -> Path:
    [found] = (run_dir / "logs").glob("hang-*")
    return found


def test_a_hung_rank_is_named_its_stacks_dumped_and_the_job_ends(hang_run):
    run_dir, run_yaml = hang_run(hang_timeout_s=4)
    proc = _launch(run_yaml, "hang:step=3:rank=1")
    _wait_for_step(proc, run_dir, 2)
    hung_at = time.monotonic()
    output = _finish(proc, timeout=4 + 60 + 60)
    ended = time.monotonic() - hung_at
    assert proc.returncode == HUNG, output[-4000:]
    assert ended < 4 + 60
    line = [x for x in output.splitlines() if x.startswith("megamobi: hang: no progress for")]
    assert len(line) == 1 and "rank 1 (" in line[0] and "behind: at step 3 data" in line[0], output[-3000:]
    report = _hang_dir(run_dir) / "report.txt"
    assert "rank 1 (" in report.read_text() and "step_0000002" in report.read_text()
    stacks = {p.name.split("-")[0]: p.read_text() for p in _hang_dir(run_dir).glob("rank*.txt")}
    assert "sleep_forever" in stacks["rank00001"]  # where the hung rank is
    assert "_train_step" in stacks["rank00000"]  # the waiting rank, inside a collective of its step
    [event] = _events(run_dir, "hang")
    assert event["ranks"] == [1] and event["step"] in (3,)
    assert [c.name for c in sorted((run_dir / "checkpoints").glob("step_*"))] == ["step_0000002"]
    print(f"\nmeasured: hang (hang_timeout_s 4) ended {ended:.1f} s after step 2 was logged")


def test_sigterm_to_a_job_with_a_stopped_rank_ends_within_the_stop_grace(hang_run):
    run_dir, run_yaml = hang_run(hang_timeout_s=120, stop_grace_s=3)
    proc = _launch(run_yaml)
    _wait_for_step(proc, run_dir, 3)
    stopped = json.loads((run_dir / "logs" / "heartbeats" / "rank00001.json").read_text())["pid"]
    os.kill(stopped, signal.SIGSTOP)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    output = _finish(proc, timeout=120)
    ended = time.monotonic() - signalled
    assert proc.returncode == HUNG, output[-4000:]
    assert ended < 3 + 30, output[-3000:]
    line = [x for x in output.splitlines() if x.startswith("megamobi: SIGTERM received, but the run made no progress")]
    assert len(line) == 1 and "no save was possible" in line[0], output[-3000:]
    assert "rank 1 (" in line[0] and "heartbeat stopped" in line[0]
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)  # the stopped rank did not outlive the job
    saved = sorted((run_dir / "checkpoints").glob("step_*"))
    assert saved and all(verify_checkpoint(c) == [] for c in saved)  # nothing saved was harmed
    [event] = _events(run_dir, "stop_timeout")
    assert event["ranks"] == [1]
    print(f"\nmeasured: SIGTERM with rank 1 stopped (stop_grace_s 3) ended the job in {ended:.1f} s")
