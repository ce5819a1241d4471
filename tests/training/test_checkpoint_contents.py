"""What a checkpoint holds besides our files, and which ones a run writes (tensor parallel T = 2)."""

import pytest
import torch
from multiproc import run_ranks
from training_runs import make_run

from megamobi.checkpointing.manifest import checkpoint_model_config, verify_checkpoint
from megamobi.checkpointing.model_files import read_full_model
from megamobi.model import MobiLlama
from megamobi.training.checkpoint import DEEPSPEED_RECOVERY_SCRIPTS, checkpoints_dir
from megamobi.training.loop import Trainer


def _train(rank, run):
    Trainer(run).train()


@pytest.fixture(scope="module")
def t2_run(tmp_path_factory, token_shards):
    # 3 steps of 256 tokens, a checkpoint every 512: step 2 by the interval, none at the end (save_final).
    run = make_run(tmp_path_factory.mktemp("t2") / "run", token_shards, train={"steps": 3, "log_interval": 1},
                   parallel={"tensor": 2, "zero_stage": 1}, checkpoint={"interval_tokens": 512, "save_final": False})
    run_ranks(_train, world_size=2, args=(run,))
    return run


def test_no_final_checkpoint_when_save_final_is_false(t2_run):
    run = t2_run
    root = checkpoints_dir(run.run_dir)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_0000002"]
    assert (root / "latest").read_text().strip() == "step_0000002"


def test_checkpoints_carry_no_deepspeed_recovery_script_and_our_files_give_the_plain_model(t2_run):
    """DeepSpeed copies zero_to_fp32.py into every checkpoint; it fails on ours at T = 2, so it is
    removed (before the manifest: the checkpoint stays whole). docs/convert.md names what to use instead."""
    run = t2_run
    checkpoint = checkpoints_dir(run.run_dir) / "step_0000002"
    assert not [p for p in checkpoint.rglob("*") if p.name in DEEPSPEED_RECOVERY_SCRIPTS]
    assert verify_checkpoint(checkpoint) == []
    state = read_full_model(checkpoint)  # the tensor-parallel halves merged: loads into the plain model
    model = MobiLlama(checkpoint_model_config(checkpoint))  # as docs/convert.md shows
    model.load_state_dict(state, strict=True)
    assert all(t.dtype == torch.float32 for t in state.values())
