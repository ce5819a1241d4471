"""A checkpoint saved under one layout (T, P, D, ZeRO) resumes under another: weights AND AdamW state."""

import dataclasses
import shutil

import torch
from multiproc import run_ranks
from training_runs import make_run, read_metrics, train_losses

from megamobi.checkpointing.model_files import read_full_model, read_full_tensors
from megamobi.training.loop import Trainer

OPTIMIZER = {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "clip_grad": 1.0, "eps": 1e-5}
CASES = [((2, 2, 1), (1, 1, 2)), ((1, 2, 2), (2, 1, 1))]  # (tensor, pipeline, data) before -> after


def _train_all(rank, runs):
    for run in runs:
        Trainer(run).train()


def _layout_run(run_dir, shards, t, p):
    return make_run(run_dir, shards, optimizer=OPTIMIZER, parallel={"tensor": t, "pipeline": p, "zero_stage": 1},
                    train={"steps": 8, "seed": 11, "log_interval": 1}, checkpoint={"interval_tokens": 4 * 8 * 32})


def test_resume_under_another_layout(tmp_path, token_shards):
    originals = [_layout_run(tmp_path / f"before{i}", token_shards, before[0], before[1]) for i, (before, _) in enumerate(CASES)]
    run_ranks(_train_all, world_size=4, args=(originals,))

    resumed = []
    for i, (_, (t, p, _d)) in enumerate(CASES):
        copy = tmp_path / f"after{i}"
        shutil.copytree(tmp_path / f"before{i}", copy)
        shutil.rmtree(copy / "checkpoints" / "step_0000008")  # resume from step 4
        (copy / "checkpoints" / "latest").write_text("step_0000004\n")
        resumed.append(_layout_run(copy, token_shards, t, p))
    run_ranks(_train_all, world_size=2, args=(resumed,))

    for i, (before, after) in enumerate(CASES):
        name = f"{before} -> {after}"
        original, copy = tmp_path / f"before{i}", tmp_path / f"after{i}"
        assert [m["step"] for m in read_metrics(copy) if "loss" in m] == list(range(1, 9)), name
        torch.testing.assert_close(torch.tensor(train_losses(copy)), torch.tensor(train_losses(original)),
                                   rtol=1e-5, atol=0, msg=name)
        final_original = read_full_model(original / "checkpoints" / "step_0000008")
        final_copy = read_full_model(copy / "checkpoints" / "step_0000008")
        for key in final_original:
            torch.testing.assert_close(final_copy[key], final_original[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")
        moments = read_full_tensors(copy / "checkpoints" / "step_0000008", "optimizer")
        assert moments.keys() == {f"{k}:{s}" for k in final_copy for s in ("exp_avg", "exp_avg_sq")}
        assert all(v.abs().sum() > 0 for k, v in moments.items() if k.endswith("exp_avg_sq"))


def test_weights_only_checkpoint_starts_a_new_run(tmp_path, token_shards):
    """checkpoint.init_from: e.g. a `convert from-hf` import; the optimizer starts fresh at step 0."""
    source = _layout_run(tmp_path / "source", token_shards, 1, 1)
    source = dataclasses.replace(source, train=dataclasses.replace(source.train, steps=4))
    run_ranks(_train_all, world_size=1, args=([source],))
    start = tmp_path / "source" / "checkpoints" / "step_0000004"
    new = make_run(tmp_path / "new", token_shards, checkpoint={"interval_tokens": 0, "init_from": str(start)},
                   train={"steps": 1, "log_interval": 1}, optimizer={**OPTIMIZER, "warmup_steps": 0})
    run_ranks(_train_all, world_size=2, args=([new],))
    [first] = read_metrics(tmp_path / "new")
    assert first["step"] == 1
    # It continued from the trained weights: far below the loss of a fresh model (~ln 512 = 6.24).
    assert first["loss"] < train_losses(tmp_path / "source")[0] - 0.005
