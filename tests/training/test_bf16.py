"""The production precision: bf16 weights and activations, fp32 master weights and AdamW state
(ZeRO-1), resumed under another layout. Tiny, because CPUs here have no fast bf16."""

import shutil

import pytest
import torch
from multiproc import run_ranks
from safetensors import safe_open
from training_runs import make_run, train_losses

from megamobi.training.loop import Trainer

KW = dict(train={"steps": 4, "seed": 11, "log_interval": 1}, checkpoint={"interval_tokens": 2 * 8 * 32})


def _train(rank, runs):
    for run in runs:
        Trainer(run).train()


@pytest.mark.parametrize("pipeline", [1, 2], ids=["data-parallel", "pipeline"])
def test_bf16_trains_like_fp32_and_reshards(tmp_path, token_shards, pipeline):
    parallel = {"pipeline": pipeline, "zero_stage": 1}
    fp32 = make_run(tmp_path / "fp32", token_shards, parallel=parallel, **KW)
    bf16 = make_run(tmp_path / "bf16", token_shards, precision="bf16", parallel=parallel, **KW)
    run_ranks(_train, world_size=2, args=([fp32, bf16],))
    losses = torch.tensor(train_losses(tmp_path / "bf16"))
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, torch.tensor(train_losses(tmp_path / "fp32")), rtol=2e-2, atol=0)
    weights = next((tmp_path / "bf16" / "checkpoints" / "step_0000004" / "model").glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as f:  # the fp32 master copy, not the bf16 weights
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}

    # Resume the bf16 run from step 2 on ONE process: it continues like the original.
    shutil.copytree(tmp_path / "bf16", tmp_path / "bf16-d1")
    shutil.rmtree(tmp_path / "bf16-d1" / "checkpoints" / "step_0000004")
    resumed = make_run(tmp_path / "bf16-d1", token_shards, precision="bf16", **KW)
    run_ranks(_train, world_size=1, args=([resumed],))
    torch.testing.assert_close(torch.tensor(train_losses(tmp_path / "bf16-d1")), losses, rtol=1e-2, atol=0)
