"""The planner's activation memory per decoder layer against the bytes autograd really saves for
backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage) in real tensor-parallel
runs of megamobi's own model: T = 1 and T = 2, with and without sequence parallelism, every
checkpointing mode, bf16 and fp32."""

import pytest
import torch
from multiproc import run_ranks

from megamobi.model_config import ModelConfig
from megamobi.plan.memory import layer_activation_bytes

SEQ, MICRO = 64, 2
SHAPE = {"name": "act", "hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 352, "vocab_size": 256,
         "max_seq_len": 64}
CASES = [(mode, sp, dtype) for mode in ("none", "full", "selective") for sp in (False, True)
         for dtype in ("bf16", "fp32")]


def _saved_bytes(model, tokens, loss_fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    return sum(storages.values())


def _per_layer_job(rank, cases):
    import torch.distributed as dist

    from megamobi.parallel import Layout, ParallelGroups, build_parallel_model

    world = dist.get_world_size()
    groups = ParallelGroups(Layout.for_world(world_size=world, tensor=world, pipeline=1))
    out = []
    for mode, sp, dtype in cases:
        if sp and world == 1:
            out.append(None)
            continue
        totals = []
        for layers in (1, 3):
            cfg = ModelConfig(num_layers=layers, activation_checkpointing=mode, **SHAPE)
            built = build_parallel_model(cfg, groups, seed=0, sequence_parallel=sp)
            model = built.module.to(torch.bfloat16 if dtype == "bf16" else torch.float32).train()
            tokens = torch.randint(0, 256, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(0))
            totals.append(_saved_bytes(model, tokens, built.loss_fn))
        out.append((totals[1] - totals[0]) / 2)
    return out


@pytest.mark.parametrize("tensor", [1, 2])
def test_activation_bytes_per_layer_match_what_autograd_saves(tensor):
    measured = run_ranks(_per_layer_job, world_size=tensor, args=(CASES,))[0]
    config = ModelConfig(num_layers=1, **SHAPE)
    for (mode, sp, dtype), value in zip(CASES, measured):
        if value is None:
            continue
        kept, _ = layer_activation_bytes(config, seq=SEQ, micro=MICRO, tensor=tensor, sequence_parallel=sp,
                                         e=2.0 if dtype == "bf16" else 4.0, checkpointing=mode, pipeline=1)
        assert kept == pytest.approx(value, rel=0.05), f"T={tensor} sequence_parallel={sp} {mode} {dtype}"
