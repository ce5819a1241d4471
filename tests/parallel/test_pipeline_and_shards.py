"""Pipeline extras and shard specs on one 4-rank job, layout (T, P, D) = (2, 2, 1):
activation checkpointing, a per-layer-FFN config, shard specs, full state dict load/gather,
re-syncing the shared FFN's replicas, and DeepSpeed's topology matching Layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from parity_jobs import SEED, max_abs_diff, parallel_run, reference_run, tiny_config

from megamobi.model import MobiLlama

SHARED = tiny_config(num_layers=4)
PER_LAYER = tiny_config(num_layers=3, ffn_sharing="per_layer")


def _shards_job(rank: int) -> dict:
    import torch.distributed as dist

    from megamobi.parallel.build import build_parallel_model
    from megamobi.parallel.groups import Layout, ParallelGroups
    from megamobi.parallel.pipeline import deepspeed_topology, shared_ffn_replica, sync_shared_ffn_replicas
    from megamobi.parallel.shard_specs import gather_full_state_dict, load_full_state_dict, parameter_shard_specs

    layout = Layout(tensor=2, pipeline=2, data=1)
    groups = ParallelGroups(layout)
    deepspeed_topology(Layout(tensor=2, pipeline=3, data=2))  # raises if DeepSpeed's rank order differs
    out: dict = {}
    built = build_parallel_model(SHARED, groups, seed=SEED)
    specs = parameter_shard_specs(built.module, groups)
    out["specs"] = {name: (s.full_key, s.split_dim, s.full_size, s.is_replica) for name, s in specs.items()}
    out["stage"] = groups.pipeline_rank

    # Load another model's weights, gather them back.
    torch.manual_seed(99)
    other = {k: v.clone() for k, v in MobiLlama(SHARED).state_dict().items()}
    load_full_state_dict(built.module, groups, full_state_dict=other)
    full = gather_full_state_dict(built.module, groups)
    out["reloaded_diff"] = None if full is None else max(float((full[k] - other[k]).abs().max()) for k in other)

    # A replica that drifted is put back to stage 0's values.
    replica = shared_ffn_replica(built.module)
    with torch.no_grad():
        if groups.pipeline_rank == 1:
            next(replica.parameters()).add_(1.0)
    out["sync_found"] = sync_shared_ffn_replicas(built.module, groups)
    out["sync_again"] = sync_shared_ffn_replicas(built.module, groups)

    # Per-layer FFNs: ordinary pipeline pieces, no tie; initialised exactly as the plain model.
    per_layer = build_parallel_model(PER_LAYER, groups, seed=SEED)
    out["per_layer_tied"] = dict(per_layer.module.tied_comms)
    full = gather_full_state_dict(per_layer.module, groups)
    if full is not None:
        torch.manual_seed(SEED)
        plain = MobiLlama(PER_LAYER).state_dict()
        out["per_layer_init_diff"] = max(float((full[k] - plain[k]).abs().max()) for k in plain)
        out["per_layer_keys"] = sorted(full) == sorted(plain)
    dist.barrier()

    out["checkpointed"] = parallel_run(rank, SHARED, (2, 2, 1), "parameters", steps=2, activation_checkpointing=True)
    # Selective: DeepSpeed recomputes only the attention pieces (checkpointable_layers).
    selective = build_parallel_model(SHARED, groups, seed=SEED, activation_checkpointing="selective").module
    out["selective_layers"] = (selective.activation_checkpoint_interval, selective.checkpointable_layers)
    out["selective"] = parallel_run(rank, SHARED, (2, 2, 1), "parameters", steps=2, activation_checkpointing="selective")
    out["per_layer_run"] = parallel_run(rank, PER_LAYER, (2, 2, 1), "uniform", steps=2)
    return out


@pytest.fixture(scope="module")
def results():
    return run_ranks(_shards_job, world_size=4)


def test_shard_specs_cover_the_plain_state_dict_once(results):
    plain_keys = set(MobiLlama(SHARED).state_dict())
    saved = {}
    for r in results:
        for name, (full_key, split_dim, _full_size, is_replica) in r["specs"].items():
            if name.startswith("tied_modules."):
                assert is_replica == (r["stage"] > 0)  # the shared FFN is saved by stage 0 only
            if not is_replica:
                saved.setdefault(full_key, set()).add(split_dim)
    assert set(saved) == plain_keys
    merged = {k: v for r in results for _, v in r["specs"].items() for k in [v[0]]}
    assert merged["embed_tokens.weight"][1:3] == (0, SHARED.vocab_size)
    assert merged["lm_head.weight"][1:3] == (0, SHARED.vocab_size)
    assert merged["layers.0.self_attn.o_proj.weight"][1:3] == (1, SHARED.hidden_size)
    assert merged["mlps.0.down_proj.weight"][1:3] == (1, SHARED.intermediate_size)
    assert merged["layers.0.input_layernorm.weight"][1:3] == (None, None)


def test_load_then_gather_round_trips(results):
    assert results[0]["reloaded_diff"] == 0.0
    assert all(r["reloaded_diff"] is None for r in results[1:])


def test_sync_shared_ffn_replicas_repairs_a_drifted_replica(results):
    for r in results:
        assert r["sync_found"] == pytest.approx(1.0)
        assert r["sync_again"] == 0.0


def test_per_layer_ffn_pipeline_has_no_tie_and_plain_init(results):
    assert all(r["per_layer_tied"] == {} for r in results)
    assert results[0]["per_layer_init_diff"] == 0.0 and results[0]["per_layer_keys"]


@pytest.mark.parametrize("mode", ["checkpointed", "selective"])
def test_activation_checkpointing_in_the_pipeline_matches(results, mode):
    reference = reference_run(SHARED, steps=2)
    assert all(r["selective_layers"] == (1, ["AttentionBlockPipe"]) for r in results)
    for r in results:
        run = r[mode]
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(run["norms"], reference["norms"], rtol=1e-4)
        assert run["replicas_ok"] == [True, True]
    assert max_abs_diff(results[0][mode]["final"], reference["final"]) < 1e-4


def test_per_layer_ffn_pipeline_trains_like_the_plain_model(results):
    reference = reference_run(PER_LAYER, steps=2)
    for r in results:
        np.testing.assert_allclose(r["per_layer_run"]["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["per_layer_run"]["norms"], reference["norms"], rtol=1e-4)
    assert max_abs_diff(results[0]["per_layer_run"]["final"], reference["final"]) < 1e-4
