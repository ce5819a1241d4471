"""Where each local parameter of a parallel model sits in the PLAIN model's state dict.

`parameter_shard_specs` maps every parameter name of a parallel module (a tensor-parallel MobiLlama,
or a DeepSpeed PipelineModule / engine) to a ShardSpec:

    full_key    the plain MobiLlama state_dict key ("layers.3.self_attn.q_proj.weight", "mlps.0...")
    split_dim   dimension split over the tensor ranks (None: this rank holds the full tensor)
    full_size   unpadded full size along split_dim (vocab_size for embedding / lm_head: the padded
                rows of the last tensor rank must be trimmed when merging)
    is_replica  a copy that another rank also saves (the shared FFN on pipeline stages > 0)

Merging shards: for each full_key, take the non-replica entries of tensor ranks 0..T-1 (any data
rank), concatenate along split_dim in tensor-rank order, narrow to full_size.
`gather_full_state_dict` / `load_full_state_dict` do exactly that in memory, collectively.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from megamobi.parallel.groups import ParallelGroups
from megamobi.parallel.pipeline import unwrap
from megamobi.parallel.pipeline_stages import PIPE_PIECES
from megamobi.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    _local_slice,
)

_SPLIT_LAYERS = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    full_key: str
    split_dim: int | None
    full_size: int | None
    is_replica: bool


def _split_info(owner: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(owner, _SPLIT_LAYERS):
        return owner.partition_dim, owner.full_size
    return None, None


def parameter_shard_specs(module, groups: ParallelGroups) -> dict[str, ShardSpec]:
    """ShardSpec for every entry of `module.named_parameters()` (names as the module reports them)."""
    module = unwrap(module)
    modules = dict(module.named_modules())
    pieces = {name: m for name, m in modules.items() if isinstance(m, PIPE_PIECES)}
    specs: dict[str, ShardSpec] = {}
    for name, param in module.named_parameters():
        owner_name, _, _leaf = name.rpartition(".")
        split_dim, full_size = _split_info(modules[owner_name])
        full_key = name
        if pieces:  # a pipeline module: map through the piece that owns the parameter
            piece_name = max((p for p in pieces if name.startswith(p + ".")), key=len)
            full_key = pieces[piece_name].full_key(name[len(piece_name) + 1:])
        is_replica = bool(getattr(param, "ds_pipe_replicated", False))
        specs[name] = ShardSpec(full_key=full_key, split_dim=split_dim, full_size=full_size, is_replica=is_replica)
    return specs


@torch.no_grad()
def gather_full_state_dict(module, groups: ParallelGroups) -> dict[str, torch.Tensor] | None:
    """The full plain-model state dict (CPU tensors) on global rank 0, None elsewhere. Collective:
    every rank must call it. Tensor shards are all-gathered within each tensor group of data rank 0,
    then each stage's tensor-rank-0 process sends its part to rank 0."""
    module = unwrap(module)
    specs = parameter_shard_specs(module, groups)
    local: dict[str, torch.Tensor] = {}
    if groups.data_rank == 0:
        T = groups.layout.tensor
        for name, param in module.named_parameters():
            spec = specs[name]
            tensor = param.detach()
            if spec.split_dim is not None and T > 1:
                parts = [torch.empty_like(tensor) for _ in range(T)]
                dist.all_gather(parts, tensor.contiguous(), group=groups.tensor_group)
                tensor = torch.cat(parts, dim=spec.split_dim)
            if spec.split_dim is not None:
                tensor = tensor.narrow(spec.split_dim, 0, spec.full_size)
            if not spec.is_replica and groups.tensor_rank == 0:
                local[spec.full_key] = tensor.cpu().clone()
    sent = local if (groups.data_rank == 0 and groups.tensor_rank == 0) else None
    if dist.get_world_size() == 1:
        return sent
    received = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(sent, received, dst=0)
    if dist.get_rank() != 0:
        return None
    full: dict[str, torch.Tensor] = {}
    for part in received:
        for key, tensor in (part or {}).items():
            if key in full:
                raise AssertionError(f"{key} was sent by two ranks: a replica is not marked as such")
            full[key] = tensor
    return full


@torch.no_grad()
def load_full_state_dict(module, groups: ParallelGroups, *, full_state_dict: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of every parameter from a full plain-model state dict (the same dict
    on every rank; e.g. torch.load(..., mmap=True) on each). Call before deepspeed.initialize: after
    it, a ZeRO optimizer keeps its own fp32 master copy of the weights."""
    module = unwrap(module)
    specs = parameter_shard_specs(module, groups)
    missing = sorted({s.full_key for s in specs.values()} - set(full_state_dict))
    if missing:
        raise KeyError(f"full state dict lacks {len(missing)} key(s), e.g. {missing[:3]}")
    for name, param in module.named_parameters():
        spec = specs[name]
        source = full_state_dict[spec.full_key]
        if spec.split_dim is not None:
            if source.shape[spec.split_dim] != spec.full_size:
                raise ValueError(f"{spec.full_key}: size {source.shape[spec.split_dim]} along dim {spec.split_dim}, "
                                 f"expected {spec.full_size}")
            source = _local_slice(source, dim=spec.split_dim, rank=groups.tensor_rank, world=groups.layout.tensor)
        if source.shape != param.shape:
            raise ValueError(f"{spec.full_key}: shard shape {tuple(source.shape)} != parameter shape {tuple(param.shape)}")
        param.copy_(source.to(dtype=param.dtype, device=param.device))
