"""The planner's static memory (parameters, gradients, optimizer state per rank) against the bytes the
real DeepSpeed engine holds on each rank of real multi-process CPU runs: within 5%, item by item."""

import pytest
from multiproc import run_ranks
from static_jobs import ZERO_EXTRA, make_run, measure_job

from megamobi.plan.inventory import stages
from megamobi.plan.memory import static_bytes

# (tensor, pipeline, zero_stage, precision). bf16 + ZeRO-0 is refused by the run config.
TWO_RANKS = [(1, 1, 0, "fp32"), (1, 1, 1, "fp32"), (1, 1, 2, "fp32"), (1, 1, 3, "fp32"),
             (1, 1, 1, "bf16"), (1, 1, 2, "bf16"), (1, 1, 3, "bf16"), (2, 1, 1, "bf16"), (1, 2, 1, "bf16")]
FOUR_RANKS = [(2, 2, 1, "bf16"), (2, 1, 2, "fp32"), (1, 2, 1, "bf16")]


def _measure_all(rank, runs):
    return [measure_job(rank, run) for run in runs]


@pytest.mark.parametrize("world, layouts", [(2, TWO_RANKS), (4, FOUR_RANKS)], ids=["2-ranks", "4-ranks"])
def test_static_memory_matches_the_engines_tensors(world, layouts):
    runs = [make_run(tensor=t, pipeline=p, zero_stage=z, precision=prec) for t, p, z, prec in layouts]
    per_rank = run_ranks(_measure_all, world_size=world, args=(runs,))
    for i, ((t, p, z, prec), run) in enumerate(zip(layouts, runs)):
        data = world // (t * p)
        stage_list = stages(run.model_config, tensor=t, pipeline=p, partition_method=run.parallel.partition_method)
        for rank, results in enumerate(per_rank):
            measured = results[i]["peak"]
            estimate = static_bytes(stage_list[results[i]["stage"]], precision=prec, zero_stage=z, data=data,
                                    ds_extra=run.deepspeed)
            name = f"T={t} P={p} D={data} ZeRO-{z} {prec} rank {rank} ({results[i]['optimizer_class']})"
            for item in ("params", "grads", "optimizer"):
                assert measured[item] > 0, f"{name}: nothing measured for {item}"
                assert estimate[item] == pytest.approx(measured[item], rel=0.05), f"{name}: {item}"
            total = sum(measured[k] for k in ("params", "grads", "optimizer"))
            assert sum(estimate[k] for k in ("params", "grads", "optimizer")) == pytest.approx(total, rel=0.05), name
            if z == 3:  # the one persistent communication buffer: ZeRO-3's reduce bucket
                bucket = ZERO_EXTRA["zero_optimization"]["reduce_bucket_size"] * (2 if prec == "bf16" else 4)
                assert measured["comm"] == bucket, name


def test_shared_ffn_replica_is_counted_once_per_stage():
    """P = 2: both stages hold one whole replica of the shared FFN, however many layers they have."""
    run = make_run(tensor=1, pipeline=2, zero_stage=1, precision="bf16")
    first, second = stages(run.model_config, tensor=1, pipeline=2, partition_method="type:AttentionBlockPipe")
    ffn = 3 * 64 * 96
    assert first.shared_ffn_params == second.shared_ffn_params == ffn
    assert first.decoder_layers == second.decoder_layers == 2
    assert sum(s.params for s in (first, second)) == 512 * 64 * 2 + 4 * (4 * 64 * 64 + 2 * 64) + 64 + 2 * ffn


def test_stage_partitions_are_deepspeeds():
    """The planner's restated partitioners give DeepSpeed's own stage boundaries."""
    import random

    from deepspeed.runtime import utils as ds_utils

    from megamobi.model_config import load_model_config
    from megamobi.plan.inventory import partition_balanced, partition_uniform, pieces

    rng = random.Random(0)
    cases = [[rng.choice([0, 1, 5, 1000, 3]) for _ in range(rng.randint(1, 30))] for _ in range(40)]
    for name in ("mobillama-0.5b", "large-base", "tiny"):
        items = pieces(load_model_config(name), tensor=1)
        cases += [[p.numel for p in items], [int(p.kind == "attention") for p in items]]
    for weights in cases:
        for parts in (1, 2, 3, 4, 7, 8):
            assert partition_balanced(weights, parts) == [int(x) for x in ds_utils.partition_balanced(weights, parts)]
            assert partition_uniform(len(weights), parts) == [int(x) for x in ds_utils.partition_uniform(len(weights), parts)]
