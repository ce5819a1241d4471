"""`kill -9` of every process, twice (once in the middle of writing a checkpoint), then the same
command again: bitwise the same losses and final weights as a run that was never interrupted."""

import os
import signal
import time
from pathlib import Path

import torch
from multiproc import run_ranks, start_ranks
from training_runs import make_run, read_metrics, train_losses

from megamobi.checkpointing.model_files import read_full_tensors
from megamobi.training.loop import Trainer

STEPS = 12


def _train(rank, run):
    Trainer(run).train()


def _kill_when(procs, condition, *, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the job never reached the point to kill it at"
        assert all(p.is_alive() for p in procs), "the job ended before it could be killed"
        time.sleep(0.001)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()


def _logged_step(run_dir: Path) -> int:
    try:
        return max((m["step"] for m in read_metrics(run_dir)), default=0)
    except (FileNotFoundError, ValueError):  # a line being written
        return 0


def test_kill_9_at_any_point_resumes_bitwise(tmp_path, token_shards):
    kwargs = dict(train={"steps": STEPS, "seed": 11, "log_interval": 1}, checkpoint={"interval_tokens": 3 * 8 * 32})
    reference = make_run(tmp_path / "reference", token_shards, **kwargs)
    run = make_run(tmp_path / "killed", token_shards, **kwargs)
    run_ranks(_train, world_size=2, args=(reference,))

    checkpoints = tmp_path / "killed" / "checkpoints"
    # 1: while step 6's checkpoint is being written (its .partial directory exists, no manifest yet).
    procs, _ = start_ranks(_train, world_size=2, args=(run,))
    _kill_when(procs, lambda: (checkpoints / ".step_0000006.partial").exists())
    assert not (checkpoints / "step_0000006").exists()
    # 2: in the middle of ordinary steps, after step 8 was logged.
    procs, _ = start_ranks(_train, world_size=2, args=(run,))
    _kill_when(procs, lambda: _logged_step(tmp_path / "killed") >= 8)
    assert not (checkpoints / f"step_{STEPS:07d}").exists()
    # 3: the same command once more, to the end.
    run_ranks(_train, world_size=2, args=(run,))

    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "reference")
    assert [m["step"] for m in read_metrics(tmp_path / "killed") if "loss" in m] == list(range(1, STEPS + 1))
    final = f"step_{STEPS:07d}"
    for kind in ("model", "optimizer"):
        expected = read_full_tensors(tmp_path / "reference" / "checkpoints" / final, kind)
        got = read_full_tensors(checkpoints / final, kind)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{kind} {key}"
