"""The real driver (config -> groups -> parallel model -> DeepSpeed engine -> loop -> checkpoint)
under tensor and pipeline layouts trains like the single process, and its checkpoints merge back
to the same plain-model weights."""

import torch
from multiproc import run_ranks
from training_runs import make_run, train_losses

from megamobi.checkpointing.manifest import read_manifest
from megamobi.checkpointing.model_files import read_full_model
from megamobi.training.loop import Trainer

# See tests/parallel/parity_jobs.py: with eps=1e-8, elements whose gradient is ~0 move by rounding noise.
OPTIMIZER = {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "clip_grad": 1.0, "eps": 1e-5}
LAYOUTS = [(2, 2, 1), (1, 2, 2), (2, 1, 2)]  # (tensor, pipeline, data) on 4 ranks


def _train_all(rank, runs):
    for run in runs:
        Trainer(run).train()


def test_tensor_and_pipeline_layouts_match_single_process(tmp_path, token_shards):
    reference = make_run(tmp_path / "single", token_shards, optimizer=OPTIMIZER)
    run_ranks(_train_all, world_size=1, args=([reference],))
    runs = [make_run(tmp_path / f"t{t}p{p}d{d}", token_shards, optimizer=OPTIMIZER, parallel={"tensor": t, "pipeline": p, "zero_stage": 1})
            for t, p, d in LAYOUTS]
    run_ranks(_train_all, world_size=4, args=(runs,))

    expected_losses = torch.tensor(train_losses(tmp_path / "single"))
    expected_weights = read_full_model(tmp_path / "single" / "checkpoints" / "step_0000006")
    for (t, p, d), run in zip(LAYOUTS, runs):
        name = f"T={t} P={p} D={d}"
        torch.testing.assert_close(torch.tensor(train_losses(run.run_dir)), expected_losses, rtol=1e-5, atol=0, msg=name)
        checkpoint = tmp_path / f"t{t}p{p}d{d}" / "checkpoints" / "step_0000006"
        assert read_manifest(checkpoint)["layout"] == {"tensor": t, "pipeline": p, "data": d, "zero_stage": 1}
        assert len(list((checkpoint / "model").glob("*.safetensors"))) == t * p
        weights = read_full_model(checkpoint)
        assert weights.keys() == expected_weights.keys(), name
        for key, value in weights.items():
            torch.testing.assert_close(value, expected_weights[key], rtol=0, atol=1e-4, msg=f"{name}: {key}")


def test_checkpoints_of_every_layout_export_to_transformers(tmp_path, token_shards):
    """Train under (T, P, D) = (2, 2, 1) and (1, 1, 1), export both final checkpoints with
    `convert to-hf`, and compare stock LlamaForCausalLM with megamobi on the same weights."""
    from transformers import LlamaForCausalLM

    from megamobi.convert import export_hf
    from megamobi.generate import load_model

    single = make_run(tmp_path / "single", token_shards, optimizer=OPTIMIZER, train={"steps": 2, "log_interval": 1})
    sharded = make_run(tmp_path / "sharded", token_shards, optimizer=OPTIMIZER, train={"steps": 2, "log_interval": 1},
                       parallel={"tensor": 2, "pipeline": 2, "zero_stage": 1})
    run_ranks(_train_all, world_size=1, args=([single],))
    run_ranks(_train_all, world_size=4, args=([sharded],))
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name in ("single", "sharded"):
        checkpoint = tmp_path / name / "checkpoints" / "step_0000002"
        export_hf(checkpoint, tmp_path / f"hf-{name}", dtype="fp32", progress=False)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / f"hf-{name}", dtype=torch.float32).eval()
        with torch.no_grad():
            ours, theirs = load_model(str(checkpoint))(tokens), hf(tokens).logits
        assert (ours - theirs).abs().max().item() < 1e-4, name
        logits[name] = theirs
    assert (logits["single"] - logits["sharded"]).abs().max().item() < 1e-3
