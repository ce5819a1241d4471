"""Issue 17, cases 1 and 12, through the real CLI (`python -m megamobi.pretrain`, one rank):

- healthy checkpoints: a healthy run stopped at step 4 (saves every 2 steps, keep_last 2) is resumed with
  optimizer.lr=1e3: step 5's finite update blows the weights up, every later step has an infinite
  gradient norm. No checkpoint of those weights is written (the save due at 6 waits, the run's last
  step stops it): exit 3 naming step 6, its infinite gradient norm (and its finite loss) and
  step_0000004, which survives and is what the sane resume picks; that resume equals an uninterrupted
  run bit for bit. Pruning never deletes the newest healthy checkpoint nor one it could not verify;
  rewinds find the newest healthy one by the manifest's health record.
- schedule changes: the finished 8-step cosine run resumed with train.steps=10 (or another lr) is
  refused at --check-only and at start (exit 2, one line, old and new values) unless
  optimizer.allow_schedule_change: true, which is recorded in the log, metrics.jsonl and the manifest.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import make_run, read_metrics

from megamobi.checkpointing.manifest import read_manifest, verify_checkpoint
from megamobi.training.checkpoint import prune_checkpoints
from megamobi.training.divergence import newest_healthy_checkpoint

REPO = Path(__file__).resolve().parents[2]
SECTIONS = dict(train={"steps": 8, "seed": 11, "log_interval": 1},
                checkpoint={"interval_tokens": 2 * 8 * 32, "keep_last": 2})  # a save every 2 steps


def _pretrain(run_yaml: Path, *args: str, faults: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "MASTER_"))}
    env.update(WORLD_SIZE="1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    if faults:
        env["MEGAMOBI_FAULTS"] = faults
    return subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--config", str(run_yaml), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def _reference(rank, run):
    from megamobi.training.loop import Trainer

    Trainer(run).train()


def _one_error_line(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megamobi: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_divergent_weights_are_never_checkpointed_and_schedule_changes_need_permission(tmp_path, token_shards):
    run_dir = tmp_path / "run"
    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_run(run_dir, token_shards, **SECTIONS))
    killed = _pretrain(run_yaml, faults="kill:step=5:rank=0")  # a healthy run, stopped at step 4
    assert killed.returncode == -9 and _names(run_dir) == ["step_0000002", "step_0000004"], killed.stderr[-3000:]

    # Case 12 on the way: another lr is another cosine schedule, refused before anything starts.
    line = _one_error_line(_pretrain(run_yaml, "optimizer.lr=1e3"), 2)
    assert "optimizer.lr: 0.01 -> 1000.0" in line and "optimizer.allow_schedule_change: true" in line, line

    # Case 1: lr 1e3. Step 5's update is applied (finite), then every step's gradient norm is inf.
    diverged = _pretrain(run_yaml, "optimizer.lr=1e3", "optimizer.allow_schedule_change=true")
    line = _one_error_line(diverged, 3)
    assert "in question since step 6: its gradient norm was inf (its loss, " in line, line  # finite: never "non-finite loss"
    assert "was finite)" in line and "stopped at step 8 (the run's last step)" in line, line
    assert f"the newest healthy checkpoint is {run_dir / 'checkpoints' / 'step_0000004'}" in line, line
    assert "checkpoint due at step 6 postponed" in diverged.stdout + diverged.stderr
    assert _names(run_dir) == ["step_0000002", "step_0000004"]  # nothing written, nothing pruned
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert newest_healthy_checkpoint(run_dir, before_step=9) == run_dir / "checkpoints" / "step_0000004"

    # The sane command resumes from step 4 and equals an uninterrupted run bit for bit.
    resumed = _pretrain(run_yaml)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_0000004'} at step 4" in resumed.stdout + resumed.stderr
    run_ranks(_reference, world_size=1, args=(make_run(tmp_path / "reference", token_shards, **SECTIONS),))
    assert _losses(run_dir) == _losses(tmp_path / "reference") and len(_losses(run_dir)) == 8
    # keep_last 2 counted from the newest healthy (8): 6 kept, 2 pruned, 4 kept (this launch resumed from it).
    assert _names(run_dir) == ["step_0000004", "step_0000006", "step_0000008"]
    manifest, last = read_manifest(run_dir / "checkpoints" / "step_0000008"), read_metrics(run_dir)[-1]
    assert (manifest["loss"], manifest["grad_norm"]) == (last["loss"], last["grad_norm"])  # its own last step
    assert manifest["healthy"] is True and manifest["non_finite_steps"] == []

    # Case 12: the finished 8-step cosine run, resumed with train.steps=10.
    for args in (("--check-only", "train.steps=10"), ("train.steps=10",)):
        line = _one_error_line(_pretrain(run_yaml, *args), 2)
        assert "steps: 8 -> 10" in line and "step_0000008" in line and "optimizer.allow_schedule_change: true" in line
        assert "the next step (9) would run at lr " in line, line
    checked = _pretrain(run_yaml, "--check-only", "train.steps=10", "optimizer.allow_schedule_change=true")
    assert checked.returncode == 0 and "on resume, accepted and recorded: steps: 8 -> 10" in checked.stdout
    extended = _pretrain(run_yaml, "train.steps=10", "optimizer.allow_schedule_change=true")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert ("optimizer.allow_schedule_change is true: continuing at step 8 with a changed lr schedule: steps: 8 -> 10"
            in extended.stdout + extended.stderr)
    # (The diverged attempt's record at step 4 stays: the resume keeps metrics.jsonl lines up to its step.)
    [record] = [m for m in read_metrics(run_dir) if "schedule_change" in m and m["step"] == 8]
    assert record == {"step": 8, "schedule_change": ["steps: 8 -> 10"], "schedule_allow_change": True}
    assert read_manifest(run_dir / "checkpoints" / "step_0000010")["schedule_changes"] == [
        {"step": 8, "changes": ["steps: 8 -> 10"], "allowed_by": "optimizer.allow_schedule_change"}]

    # Pruning, directly: a broken older copy (7), a broken newer one (9) and an unhealthy newer one (11),
    # as an earlier attempt or older code could leave them. Only the healthy, verified 8 goes.
    root = run_dir / "checkpoints"
    for name, how in (("step_0000007", "broken"), ("step_0000009", "broken"), ("step_0000011", "unhealthy")):
        shutil.copytree(root / "step_0000008", root / name)
        if how == "broken":
            victim = next((root / name / "model").glob("*.safetensors"))
            victim.write_bytes(victim.read_bytes()[:-1] + b"!")
        else:
            manifest = read_manifest(root / name)
            (root / name / "megamobi.json").write_text(json.dumps({**manifest, "healthy": False}))
    assert verify_checkpoint(root / "step_0000007") and not verify_checkpoint(root / "step_0000011")
    assert _names(run_dir)[-2:] == ["step_0000010", "step_0000011"]
    assert prune_checkpoints(run_dir, keep_last=1, protect=()) == [root / "step_0000008"]
    assert _names(run_dir) == ["step_0000007", "step_0000009", "step_0000010", "step_0000011"]
    assert newest_healthy_checkpoint(run_dir, before_step=100) == root / "step_0000010"  # not 11 (unhealthy), 9 (broken)


def _signalled_in_question(rank, run):
    """SIGTERM right after a NaN step (MEGAMOBI_FAULTS nan, this forked rank only): the save it asks for
    cannot hold weights in question."""
    import signal

    from megamobi.training.loop import NonFiniteLossError, Trainer

    class SignalledAfterStep3(Trainer):
        def _log_step(self, **kwargs):
            super()._log_step(**kwargs)
            if self.state.step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    os.environ["MEGAMOBI_FAULTS"] = "nan:step=3:rank=0"
    try:
        SignalledAfterStep3(run).train()
    except NonFiniteLossError as err:
        return str(err)
    return None


def test_a_signal_while_the_weights_are_in_question_saves_nothing(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, **{**SECTIONS, "train": {**SECTIONS["train"], "steps": 4}})
    [message] = run_ranks(_signalled_in_question, world_size=1, args=(run,))
    assert message.startswith("stopped at step 3 (SIGTERM received) without writing a checkpoint: the weights are in "
                              "question since step 3: its loss (nan) and its gradient norm (inf) were not finite"), message
    assert f"the newest healthy checkpoint is {tmp_path / 'r' / 'checkpoints' / 'step_0000002'}" in message
    assert _names(tmp_path / "r") == ["step_0000002"]
