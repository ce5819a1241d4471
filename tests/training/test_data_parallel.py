"""2 data-parallel processes under ZeRO 0/1/2/3 train exactly like 1 process with the same global batch."""

import torch
from multiproc import run_ranks
from training_runs import make_run, train_losses

from megamobi.checkpointing.model_files import read_full_model
from megamobi.training.loop import Trainer


def _train(rank, runs):
    out = []
    for run in runs:
        Trainer(run).train()
        out.append(train_losses(run.run_dir) if rank == 0 else None)
    return out


def test_zero_stages_match_single_process(tmp_path, token_shards):
    single = make_run(tmp_path / "single", token_shards)
    [reference] = run_ranks(_train, world_size=1, args=([single],))[0]
    assert len(reference) == 6 and reference[-1] < reference[0]

    runs = [make_run(tmp_path / f"zero{stage}", token_shards, parallel={"zero_stage": stage}) for stage in range(4)]
    results = run_ranks(_train, world_size=2, args=(runs,))[0]
    reference_weights = read_full_model(tmp_path / "single" / "checkpoints" / "step_0000006")
    for stage, losses in enumerate(results):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0,
                                   msg=f"ZeRO-{stage} losses differ from the single process")
        weights = read_full_model(tmp_path / f"zero{stage}" / "checkpoints" / "step_0000006")
        assert weights.keys() == reference_weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(value, reference_weights[key], rtol=0, atol=1e-5, msg=f"ZeRO-{stage} {key}")
