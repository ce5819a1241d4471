"""Parallelism applied to the plain model: process groups, tensor-parallel layers, pipeline stages.

The training driver needs only:

    groups = ParallelGroups(Layout.for_world(world_size=..., tensor=T, pipeline=P))
    built = build_parallel_model(model_config, groups, seed=seed)   # module, loss_fn, is_pipeline
    parameter_shard_specs / gather_full_state_dict / load_full_state_dict   (checkpoints, conversion)
    sync_shared_ffn_replicas(engine, groups)                               (after a checkpoint load)

`validate_layout` checks a layout against a model config before any process group exists.
See docs/parallelism.md.
"""

from megamobi.parallel.build import ParallelModel, build_parallel_model
from megamobi.parallel.groups import Layout, ParallelGroups
from megamobi.parallel.pipeline import (
    PIPELINE_DS_CONFIG,
    build_pipeline_module,
    deepspeed_topology,
    shared_ffn_replica,
    sync_shared_ffn_replicas,
)
from megamobi.parallel.shard_specs import ShardSpec, gather_full_state_dict, load_full_state_dict, parameter_shard_specs
from megamobi.parallel.tensor_plan import (
    apply_tensor_parallel,
    tensor_parallel_loss,
    validate_layout,
    validate_sequence_parallel,
)

__all__ = [
    "PIPELINE_DS_CONFIG",
    "Layout",
    "ParallelGroups",
    "ParallelModel",
    "ShardSpec",
    "apply_tensor_parallel",
    "build_parallel_model",
    "build_pipeline_module",
    "deepspeed_topology",
    "gather_full_state_dict",
    "load_full_state_dict",
    "parameter_shard_specs",
    "shared_ffn_replica",
    "sync_shared_ffn_replicas",
    "tensor_parallel_loss",
    "validate_layout",
    "validate_sequence_parallel",
]
