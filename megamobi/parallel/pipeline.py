"""Pipeline parallelism through DeepSpeed's PipelineModule, with MobiLlama's shared FFN tied across
ALL stages.

    torch.manual_seed(seed); MobiLlama(cfg)          # the full plain model, identical on every rank
    apply_tensor_parallel(model, groups)             # keep this tensor rank's shards
    [EmbeddingPipe, (AttentionBlockPipe_i, MLP_i) x L, HeadPipe]  -> PipelineModule

With `ffn_sharing: shared`, MLP_i is `TiedLayerSpec("shared_ffn", MLPBlockPipe, mlp=model.mlps[0])`:
each stage builds ONE replica (wrapping the same already-initialised weights, so every replica
starts equal to the plain model's FFN), and DeepSpeed

  * broadcasts the tied weights from the lowest stage at build and after `load_checkpoint`
    (PipelineModule._synchronize_tied_weights);
  * all-reduces (sums) their gradients over the tie group in the schedule's ReduceTiedGrads step,
    before the data-parallel reduce and the optimizer step, on `param.grad` (fp32 in an fp32 run;
    with bf16 + ZeRO-1 + fp32 grad accumulation, BF16_Optimizer's fp32 `_hp_grad`);
  * marks the replicas on stages > 0 `ds_pipe_replicated`, so the gradient norm counts the FFN once.

The tie group is the whole pipeline group (asserted at build).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megamobi.config_io import ConfigError
from megamobi.model import MobiLlama
from megamobi.model_config import ModelConfig, checkpointing_mode
from megamobi.parallel.groups import Layout, ParallelGroups
from megamobi.parallel.pipeline_stages import AttentionBlockPipe, EmbeddingPipe, HeadPipe, MLPBlockPipe
from megamobi.parallel.tensor_plan import apply_tensor_parallel, tensor_parallel_loss, validate_layout

SHARED_FFN_KEY = "shared_ffn"

# DeepSpeed's pipe engine "partitions" stage-boundary activations over the tensor group, but only
# for a boundary that carries ONE grad-requiring tensor; ours may carry (h, normed). Merge this into
# the ds_config of every pipeline run.
PIPELINE_DS_CONFIG = {"pipeline": {"pipe_partitioned": False, "grad_partitioned": False}}


def deepspeed_topology(layout: Layout):
    """DeepSpeed's topology for the layout, checked to give every rank the same coordinates as Layout
    (tensor innermost, then data, then pipeline), so our groups and DeepSpeed's agree."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topo = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor, num_dp=layout.data)
    for rank in range(layout.world_size):
        coord = topo.get_coord(rank)
        if (coord.model, coord.data, coord.pipe) != layout.coordinates(rank):
            raise AssertionError(f"DeepSpeed topology puts rank {rank} at {coord}, Layout at {layout.coordinates(rank)}")
    return topo


def pipeline_layers(model: MobiLlama, *, sequence_parallel_size: int = 1) -> list:
    """The plain model as a flat list of pipeline pieces (modules or TiedLayerSpecs).
    sequence_parallel_size: T when the model was made tensor parallel with sequence_parallel, else 1."""
    from deepspeed.pipe import TiedLayerSpec

    shared = model.config.ffn_sharing == "shared"
    # tied_weight_attr: the weights DeepSpeed broadcasts and all-reduces across the tie group.
    tied_attrs = [f"mlp.{name}" for name, _ in model.mlps[0].named_parameters()]
    layers: list = [EmbeddingPipe(model.embed_tokens)]
    for i, layer in enumerate(model.layers):
        layers.append(AttentionBlockPipe(layer, layer_index=i, rope_cos=model.rope_cos, rope_sin=model.rope_sin,
                                         sequence_parallel_size=sequence_parallel_size))
        if shared:
            layers.append(TiedLayerSpec(SHARED_FFN_KEY, MLPBlockPipe, model.mlps[0], tied_weight_attr=tied_attrs))
        else:
            layers.append(MLPBlockPipe(model.mlps[i], mlp_index=i))
    layers.append(HeadPipe(model.norm, model.lm_head))
    return layers


def build_pipeline_module(model_config: ModelConfig, groups: ParallelGroups, *, seed: int,
                          partition_method: str = "parameters", activation_checkpointing: bool | str = "none",
                          sequence_parallel: bool = False):
    """A deepspeed PipelineModule for this rank's stage, initialised exactly as
    `torch.manual_seed(seed); MobiLlama(model_config)` (then tensor-parallel sharded).

    partition_method: DeepSpeed's `parameters` (balance parameter counts), `uniform` (balance piece
    counts) or `type:<regex>` (balance pieces whose class matches, e.g. `type:AttentionBlockPipe`
    for the same number of decoder layers per stage). Loss: `tensor_parallel_loss` on the last stage.
    sequence_parallel: see `apply_tensor_parallel`; stage boundaries then carry sequence chunks.
    activation_checkpointing: "full" recomputes every piece, "selective" only the attention pieces.
    """
    import deepspeed
    from deepspeed.pipe import PipelineModule

    layout = groups.layout
    mode = checkpointing_mode(activation_checkpointing)
    validate_layout(model_config, tensor=layout.tensor, pipeline=layout.pipeline,
                    world_size=layout.world_size, zero_stage=1, sequence_parallel=sequence_parallel)
    torch.manual_seed(seed)
    model = MobiLlama(model_config)
    apply_tensor_parallel(model, groups, sequence_parallel=sequence_parallel)
    module = PipelineModule(
        layers=pipeline_layers(model, sequence_parallel_size=layout.tensor if sequence_parallel else 1),
        topology=deepspeed_topology(layout),
        loss_fn=tensor_parallel_loss(groups, model_config.vocab_size),
        partition_method=partition_method,
        activation_checkpoint_interval=0 if mode == "none" else 1,
        # Selective: DeepSpeed checkpoints only the pieces of these classes (one piece per interval).
        checkpointable_layers=["AttentionBlockPipe"] if mode == "selective" else None,
        # The default (reentrant) checkpoint fails on stage 0, whose input ids need no grad.
        activation_checkpoint_func=deepspeed.checkpointing.non_reentrant_checkpoint,
    )
    _check_tie_group(module, groups)
    return module


def _check_tie_group(module, groups: ParallelGroups) -> None:
    if groups.layout.pipeline == 1 or not _is_shared(module):
        return
    comm = module.tied_comms.get(SHARED_FFN_KEY)
    expected = dist.get_process_group_ranks(groups.pipeline_group)
    if comm is None or sorted(comm["ranks"]) != sorted(expected):
        raise ConfigError(
            f"the shared FFN must live on every pipeline stage, but the partition gave it to ranks "
            f"{None if comm is None else comm['ranks']} of pipeline group {expected}; use partition_method "
            f"'type:AttentionBlockPipe' or 'uniform' so every stage holds at least one decoder layer's FFN")


def _is_shared(module) -> bool:
    return any(getattr(spec, "key", None) == SHARED_FFN_KEY for spec in module._layer_specs)


def unwrap(engine_or_module) -> nn.Module:
    """The nn.Module inside a DeepSpeed engine (or the module itself)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return engine_or_module.module if isinstance(engine_or_module, DeepSpeedEngine) else engine_or_module


def shared_ffn_replica(engine_or_module) -> nn.Module | None:
    """This stage's replica of the shared FFN (a MLPBlockPipe), or None (plain model / per-layer FFN)."""
    module = unwrap(engine_or_module)
    tied = getattr(module, "tied_modules", None)
    return None if tied is None or SHARED_FFN_KEY not in tied else tied[SHARED_FFN_KEY]


@torch.no_grad()
def sync_shared_ffn_replicas(engine_or_module, groups: ParallelGroups) -> float:
    """Broadcast the shared FFN from pipeline stage 0 to every other stage; returns the largest
    difference found before the broadcast (0.0 when they already matched), for logging.

    Call after every checkpoint load. If called after deepspeed.initialize on an engine, the
    optimizer's fp32 master copy is refreshed too (engine.optimizer.refresh_fp32_params), so the
    next step does not write the old values back.
    """
    replica = shared_ffn_replica(engine_or_module)
    if groups.layout.pipeline == 1 or replica is None:
        return 0.0
    src = groups.layout.rank_of(tensor=groups.tensor_rank, data=groups.data_rank, pipeline=0)
    params = list(replica.parameters())
    worst = torch.zeros(1, device=params[0].device)
    for param in params:
        reference = param.detach().clone()
        dist.broadcast(reference, src=src, group=groups.pipeline_group)
        worst = torch.maximum(worst, (reference - param).abs().max().float().reshape(1))
        param.copy_(reference)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=groups.pipeline_group)
    optimizer = getattr(engine_or_module, "optimizer", None)
    if worst.item() > 0 and optimizer is not None and hasattr(optimizer, "refresh_fp32_params"):
        optimizer.refresh_fp32_params()
    return float(worst.item())
