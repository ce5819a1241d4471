"""Stop and resume, non-finite steps, checkpoint arithmetic, the LR schedule and config errors."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from multiproc import run_ranks
from run_yaml import write_run_yaml
from training_runs import make_run, read_metrics

from megamobi.checkpointing.manifest import read_manifest
from megamobi.checkpointing.model_files import read_full_model
from megamobi.config_io import ConfigError
from megamobi.training.checkpoint import find_resume_checkpoint
from megamobi.training.ds_config import build_ds_config
from megamobi.training.loop import NonFiniteLossError, Trainer, checkpoint_due
from megamobi.training.schedule import learning_rate

STABLE = ("tokens_per_s", "tokens_per_s_per_device", "step_time_s", "memory_gb", "memory_gb_max")


class SignalledAt(Trainer):
    """A real SIGUSR1 (what SLURM sends before the time limit) delivered after step `stop_step`."""

    stop_step = 3

    def _log_step(self, **kwargs):
        super()._log_step(**kwargs)
        if self.state.step == self.stop_step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _stop_then_resume(rank, uninterrupted, interrupted):
    Trainer(uninterrupted).train()
    first = SignalledAt(interrupted).train()
    stopped_at = first.step
    final = Trainer(interrupted).train()
    return stopped_at, final.step, final.consumed_samples


def _metrics_without_timing(run_dir):
    return [{k: v for k, v in m.items() if k not in STABLE} for m in read_metrics(run_dir)]


@pytest.mark.parametrize("pipeline", [1, 2], ids=["data-parallel", "pipeline"])
def test_stopped_run_resumes_to_the_same_weights(tmp_path, token_shards, pipeline):
    every_two_steps = {"interval_tokens": 2 * 8 * 32}
    kwargs = dict(checkpoint=every_two_steps, train={"steps": 7, "seed": 11, "log_interval": 1, "eval_interval": 3},
                  data={"paths": [str(token_shards)], "seed": 7, "val_fraction": 0.1},
                  parallel={"pipeline": pipeline, "zero_stage": 1})
    a = make_run(tmp_path / "a", token_shards, **kwargs)
    b = make_run(tmp_path / "b", token_shards, **kwargs)
    results = run_ranks(_stop_then_resume, world_size=2, args=(a, b))
    stopped_at, final_step, consumed = results[0]
    assert stopped_at == 3 and final_step == 7 and consumed == 7 * 8
    # The signal made a checkpoint at step 3 although the interval asks for even steps only.
    assert (tmp_path / "b" / "checkpoints" / "step_0000003").is_dir()
    final_a = read_full_model(tmp_path / "a" / "checkpoints" / "step_0000007")
    final_b = read_full_model(tmp_path / "b" / "checkpoints" / "step_0000007")
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key
    assert _metrics_without_timing(tmp_path / "a") == _metrics_without_timing(tmp_path / "b")
    manifest = read_manifest(tmp_path / "b" / "checkpoints" / "step_0000007")
    assert manifest["consumed_samples"] == 56
    assert manifest["layout"] == {"tensor": 1, "pipeline": pipeline, "data": 2 // pipeline, "zero_stage": 1}
    assert str(token_shards) in manifest["data_manifests"]


def test_corrupt_latest_checkpoint_is_skipped(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, checkpoint={"interval_tokens": 2 * 8 * 32}, train={"steps": 4, "log_interval": 1})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    newest = tmp_path / "r" / "checkpoints" / "step_0000004"
    victim = next((newest / "model").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-8] + b"garbage!")
    messages = []
    found = find_resume_checkpoint(tmp_path / "r", report=messages.append)
    assert found == tmp_path / "r" / "checkpoints" / "step_0000002"
    assert "sha256 differs" in messages[0] and "step_0000004" in messages[0]


def _nan_run(rank, run, faults):
    os.environ["MEGAMOBI_FAULTS"] = faults  # in this forked rank only
    try:
        Trainer(run).train()
    except NonFiniteLossError as err:
        return str(err)
    return None


def test_non_finite_steps_are_skipped_and_counted(tmp_path, token_shards):
    every_step = {"interval_tokens": 8 * 32}
    run = make_run(tmp_path / "nan", token_shards, checkpoint=every_step,
                   train={"steps": 5, "log_interval": 1}, parallel={"zero_stage": 0})
    assert run_ranks(_nan_run, world_size=2, args=(run, "nan:step=3:rank=1")) == [None, None]
    metrics = read_metrics(tmp_path / "nan")
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    assert math.isfinite(metrics[-1]["loss"])
    ckpt = tmp_path / "nan" / "checkpoints"
    # The weights after the NaN at step 3 are in question: the save due at step 3 waits for step 4, which
    # runs cleanly on them (docs/training.md "Healthy checkpoints"); its manifest records step 3.
    assert [p.name for p in sorted(ckpt.glob("step_*"))] == [f"step_{s:07d}" for s in (1, 2, 4, 5)]
    manifest = read_manifest(ckpt / "step_0000004")
    assert manifest["non_finite_steps"] == [3] and manifest["healthy"] is True
    assert manifest["loss"] == metrics[3]["loss"] and manifest["grad_norm"] == metrics[3]["grad_norm"]
    state = json.loads((ckpt / "step_0000004" / "trainer_state.json").read_text())
    assert state["adam_step"] == 3, "a skipped step changed the weights"  # steps 1, 2 and 4 applied
    later = read_full_model(ckpt / "step_0000004")
    assert all(torch.isfinite(v).all() for v in later.values())


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_too_many_non_finite_steps_stop_the_run(tmp_path, token_shards, zero_stage):
    run = make_run(tmp_path / "nan", token_shards,
                   train={"steps": 6, "log_interval": 1, "max_bad_steps": 3}, parallel={"zero_stage": zero_stage})
    errors = run_ranks(_nan_run, world_size=2, args=(run, "nan:step=1:rank=0;nan:step=2:rank=1;nan:step=3:rank=0"))
    assert all("stopped at step 3 (3 steps in a row were refused, train.max_bad_steps" in e for e in errors), errors
    assert all("in question since step 1: its loss" in e and "no healthy checkpoint" in e for e in errors)


def test_checkpoint_interval_in_tokens():
    tokens_per_step = 800 * 2048  # the paper: 3.3B tokens = 2014.2 steps
    saves = [s for s in range(1, 6000)
             if checkpoint_due(consumed_tokens_before=(s - 1) * tokens_per_step, consumed_tokens_after=s * tokens_per_step,
                               interval_tokens=3_300_000_000)]
    assert saves == [2015, 4029]
    assert not checkpoint_due(consumed_tokens_before=0, consumed_tokens_after=10**12, interval_tokens=0)


def test_learning_rate_schedule_is_the_papers():
    kw = dict(lr=3e-4, min_lr=3e-5, warmup_steps=2000, total_steps=732_422)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(1000, **kw) == pytest.approx(1.5e-4)
    assert learning_rate(2000, **kw) == pytest.approx(3e-4)
    middle = 2000 + (732_422 - 2000) // 2
    assert learning_rate(middle, **kw) == pytest.approx((3e-4 + 3e-5) / 2, rel=1e-5)
    assert learning_rate(732_422, **kw) == pytest.approx(3e-5)
    assert learning_rate(900_000, **kw) == pytest.approx(3e-5)


def test_ds_config_is_derived_from_the_run(tmp_path, token_shards):
    run = make_run(tmp_path, token_shards, batch={"micro_batch_size": 2, "global_batch_size": 16, "seq_len": 32},
                   deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}})
    config = build_ds_config(run, world_size=2)
    assert config["gradient_accumulation_steps"] == 4 and config["gradient_clipping"] == 1.0
    assert config["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    assert "bf16" not in config


@pytest.mark.parametrize("overrides, world, message", [
    (["batch.global_batch_size=10"], 4, "batch.global_batch_size 10 is not divisible by micro_batch_size x data-parallel size = 2 x 4"),
    (["data.paths=[/nonexistent/shards]"], 1, "data.paths: /nonexistent/shards does not exist"),
    (["batch.seq_len=128"], 1, "batch.seq_len 128 is longer than the model's max_seq_len 64"),
    (["train.tokens=1000"], 1, "give exactly one of train.steps and train.tokens"),
    (["parallel.tensor=3"], 3, "num_attention_heads"),
    (["optimizer.lr=fast"], 1, "optimizer.lr: expected a number, got 'fast'"),
])
def test_impossible_settings_fail_before_any_process_group(tmp_path, token_shards, repo_root, overrides, world, message):
    path = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards))
    proc = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--config", str(path), *overrides],
                          cwd=repo_root, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": str(world)})
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_wandb_run_id_survives_resume_and_tensorboard_logs(tmp_path, token_shards):
    """wandb (offline, no network) and TensorBoard on; the resumed run reuses the wandb run id."""
    run = make_run(tmp_path / "logged", token_shards, train={"steps": 4, "log_interval": 1},
                   logging={"wandb": True, "wandb_mode": "offline", "tensorboard": True})

    class StopsAt2(SignalledAt):
        stop_step = 2

    def job(rank):
        StopsAt2(run).train()
        first = json.loads((tmp_path / "logged" / "checkpoints" / "step_0000002" / "trainer_state.json").read_text())
        Trainer(run).train()
        last = json.loads((tmp_path / "logged" / "checkpoints" / "step_0000004" / "trainer_state.json").read_text())
        return first["wandb_run_id"], last["wandb_run_id"]

    [(first_id, last_id)] = run_ranks(job, world_size=1)
    assert first_id and first_id == last_id
    assert list((tmp_path / "logged" / "wandb").glob(f"offline-run-*-{first_id}"))
    assert list((tmp_path / "logged" / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_table_reports_damage(tmp_path, token_shards, repo_root):
    run = make_run(tmp_path / "r", token_shards, checkpoint={"interval_tokens": 2 * 8 * 32}, train={"steps": 4, "log_interval": 1})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    victim = next((tmp_path / "r" / "checkpoints" / "step_0000004" / "optimizer").glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    proc = subprocess.run([sys.executable, "-m", "megamobi.checkpoints", str(tmp_path / "r"), "--verify"],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # a BROKEN checkpoint: scripts can test the exit status
    out = proc.stdout.splitlines()
    assert out[0].split()[:4] == ["checkpoint", "step", "samples", "tokens"]
    step2, step4 = out[1].split(), out[2].split()
    assert step2[:4] == ["step_0000002", "2", "16", "512"] and step2[-1] == "verified"
    assert "BROKEN:" in out[2] and "sha256 differs" in out[2] and step4[5:9] == ["T1", "P1", "D1", "Z1"]


def test_a_fresh_run_never_overwrites_checkpoints(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 2, "log_interval": 1})
    fresh = make_run(tmp_path / "r", token_shards, train={"steps": 2, "log_interval": 1}, checkpoint={"resume": False})

    def job(rank):
        Trainer(run).train()
        try:
            Trainer(fresh)
        except ConfigError as err:
            return str(err)

    [message] = run_ranks(job, world_size=1)
    assert "already holds checkpoints and checkpoint.resume is false" in message
    assert (tmp_path / "r" / "checkpoints" / "step_0000002" / "megamobi.json").is_file()


def test_data_problems_fail_before_any_process_group(tmp_path, token_shards, repo_root):
    path = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards))
    proc = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(path),
                           "data.source_weights={c4: 1.0, c5: 2.0}"], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 2 and "source_weights names unknown sources ['c5']" in proc.stderr, proc.stderr


def test_keep_last_deletes_only_older_checkpoints(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 4, "log_interval": 1},
                   checkpoint={"interval_tokens": 8 * 32, "keep_last": 2})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["latest", "step_0000003", "step_0000004"]
    assert (tmp_path / "r" / "checkpoints" / "latest").read_text() == "step_0000004\n"
