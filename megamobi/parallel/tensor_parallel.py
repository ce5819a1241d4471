"""Megatron-style tensor parallelism, written as autograd Functions over a process group.

The four region primitives (Megatron-core's names):

    copy_to_tensor_parallel_region      forward: identity        backward: all-reduce
    reduce_from_tensor_parallel_region  forward: all-reduce      backward: identity
    gather_from_tensor_parallel_region  forward: all-gather (-1) backward: split (-1)
    scatter_to_tensor_parallel_region   forward: split (-1)      backward: all-gather (-1)

and the sequence-parallel pair, along the sequence dimension (dim 1 of megamobi's [batch, seq,
hidden] activations):

    gather_from_sequence_parallel_region        forward: all-gather  backward: reduce-scatter
    reduce_scatter_to_sequence_parallel_region  forward: reduce-scatter  backward: all-gather
    scatter_to_sequence_parallel_region         forward: split       backward: all-gather

Every primitive is the identity when the group has one rank, so a T=1 run pays nothing.

Sequence parallelism (Megatron's `sequence_parallel`) also needs two plan-level helpers:
`sequence_gather_pre_hook` (gathers a block's input once, for all its column-parallel layers,
which are then built with `input_is_gathered=True`) and `mark_sequence_parallel` (sums a replicated
weight's gradient over the tensor group, for the norms that only see their sequence chunk).

The layers (`ColumnParallelLinear`, `RowParallelLinear`, `VocabParallelEmbedding`) hold this rank's
slice of a full weight. They are built from the full nn.Linear / nn.Embedding of a plain model
(`from_linear` / `from_embedding`), so the initialisation never depends on T. Split weights carry
`tensor_model_parallel = True` (and `partition_dim`): DeepSpeed's gradient-norm code counts such
parameters on every tensor rank and everything else (norm weights, replicated) only on tensor rank 0.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megamobi.config_io import ConfigError
from megamobi.parallel.groups import ParallelGroups

SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _split(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the {world} tensor-parallel ranks")
    return x.chunk(world, dim=dim)[_rank(group)].contiguous()


def _reduce_scatter(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} is not divisible by the {world} tensor-parallel ranks")
    parts = [p.contiguous() for p in x.chunk(world, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherFromSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        # The full-sequence activation fed a tensor-parallel (column) layer on every rank: each rank
        # holds a partial gradient, so the sum is scattered back to the sequence owners.
        return _reduce_scatter(grad, ctx.group, SEQUENCE_DIM), None


class _ReduceScatterToSequenceRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, SEQUENCE_DIM)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, SEQUENCE_DIM), None


def copy_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group) if _size(group) > 1 else x


def reduce_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group) if _size(group) > 1 else x


def gather_from_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromRegion.apply(x, group, -1) if _size(group) > 1 else x


def scatter_to_tensor_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group, -1) if _size(group) > 1 else x


def gather_from_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _GatherFromSequenceRegion.apply(x, group) if _size(group) > 1 else x


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceScatterToSequenceRegion.apply(x, group) if _size(group) > 1 else x


def scatter_to_sequence_parallel_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ScatterToRegion.apply(x, group, SEQUENCE_DIM) if _size(group) > 1 else x


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def padded_size(size: int, world: int) -> int:
    """`size` rounded up to a multiple of the tensor-parallel size (the vocabulary padding)."""
    return int(math.ceil(size / world) * world)


def _local_slice(full: torch.Tensor, *, dim: int, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of `full` along `dim`, zero-padded at the end to a multiple of world."""
    size = full.shape[dim]
    target = padded_size(size, world)
    if target != size:
        pad_shape = list(full.shape)
        pad_shape[dim] = target - size
        full = torch.cat([full, full.new_zeros(pad_shape)], dim=dim)
    return full.chunk(world, dim=dim)[rank].clone()


def mark_tensor_parallel(param: nn.Parameter, *, partition_dim: int) -> None:
    """Flags DeepSpeed (runtime/utils.is_model_parallel_parameter) reads to count a split weight's
    gradient norm on every tensor rank instead of on tensor rank 0 only."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


def mark_sequence_parallel(param: nn.Parameter, group) -> None:
    """A replicated weight (an RMSNorm's) applied to this rank's sequence chunk only: its gradient is
    a partial sum, so it is summed over the tensor group before anything else sees it.

    Megatron sums such grads in finalize_model_grads; here a tensor hook does it inside backward,
    BEFORE autograd accumulates into param.grad, so whoever reads the gradient afterwards (DeepSpeed
    ZeRO-1/2's post-accumulate-grad hooks, the pipeline engine's reductions, the optimizer) sees the
    full-sequence gradient, identical on every tensor rank. Marked `sequence_parallel = True`
    (Megatron's flag); idempotent.
    """
    if getattr(param, "sequence_parallel", False):
        return
    param.sequence_parallel = True
    if _size(group) == 1:
        return

    def sum_over_tensor_group(grad: torch.Tensor) -> torch.Tensor:
        return _all_reduce(grad.clone(), group)

    param.register_hook(sum_over_tensor_group)


def sequence_gather_pre_hook(group):
    """A forward pre-hook that all-gathers a block's first input along the sequence (backward:
    reduce-scatter), for a block whose column-parallel layers have `input_is_gathered=True`: one
    gather for q, k and v (or gate and up), and the block's own code sees the full sequence length."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        return (gather_from_sequence_parallel_region(x, group), *rest)

    return hook


class ColumnParallelLinear(nn.Module):
    """y = x A^T with A split along its OUTPUT dimension: rank r holds rows [r*out/T, (r+1)*out/T).

    Input: the full activation (or its sequence shard with sequence_parallel, gathered here).
    Output: this rank's slice of the output features, or the full output with gather_output=True.

    input_is_gathered: the input is already the full sequence, gathered ONCE for several layers by
    `gather_from_sequence_parallel_region` (e.g. by `sequence_gather_pre_hook` on the attention
    block, for q, k and v); that gather's backward reduce-scatters the summed input gradient, so
    this layer does no communication on its input at all.
    """

    partition_dim = 0

    def __init__(self, in_features: int, out_features: int, *, groups: ParallelGroups,
                 gather_output: bool = False, sequence_parallel: bool = False, input_is_gathered: bool = False):
        super().__init__()
        world = groups.layout.tensor
        if out_features % world:
            raise ValueError(f"output size {out_features} is not divisible by tensor-parallel size {world}")
        if sequence_parallel and input_is_gathered:
            raise ValueError("sequence_parallel gathers the input here; input_is_gathered says it is gathered already")
        self.group = groups.tensor_group
        self.in_features, self.out_features = in_features, out_features
        self.full_size = out_features  # unpadded size along partition_dim
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.input_is_gathered = input_is_gathered
        self.weight = nn.Parameter(torch.empty(out_features // world, in_features))
        mark_tensor_parallel(self.weight, partition_dim=0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, groups: ParallelGroups, gather_output: bool = False,
                    sequence_parallel: bool = False, input_is_gathered: bool = False,
                    pad_output: bool = False) -> ColumnParallelLinear:
        """This rank's rows of `linear`. pad_output: pad the output features with zero rows to a
        multiple of T (the vocabulary-parallel lm_head; `full_size` keeps the unpadded size)."""
        if linear.bias is not None:
            raise ValueError("megamobi's linear layers have no bias")
        if gather_output and pad_output:
            raise ValueError("a padded output cannot be gathered into the full output")
        out = padded_size(linear.out_features, groups.layout.tensor) if pad_output else linear.out_features
        layer = cls(linear.in_features, out, groups=groups, gather_output=gather_output,
                    sequence_parallel=sequence_parallel, input_is_gathered=input_is_gathered)
        layer.full_size = linear.out_features
        with torch.no_grad():
            layer.weight.copy_(_local_slice(linear.weight, dim=0, rank=groups.tensor_rank, world=groups.layout.tensor))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, self.group)
        elif not self.input_is_gathered:
            x = copy_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight)
        return gather_from_tensor_parallel_region(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T with A split along its INPUT dimension: rank r holds columns [r*in/T, (r+1)*in/T).

    Input: this rank's slice of the input features (input_is_parallel, the usual case after a
    column-parallel layer). Output: the full output, summed over ranks (or reduce-scattered along
    the sequence with sequence_parallel).
    """

    partition_dim = 1

    def __init__(self, in_features: int, out_features: int, *, groups: ParallelGroups,
                 input_is_parallel: bool = True, sequence_parallel: bool = False):
        super().__init__()
        world = groups.layout.tensor
        if in_features % world:
            raise ValueError(f"input size {in_features} is not divisible by tensor-parallel size {world}")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        self.group = groups.tensor_group
        self.in_features, self.out_features = in_features, out_features
        self.full_size = in_features
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, in_features // world))
        mark_tensor_parallel(self.weight, partition_dim=1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, groups: ParallelGroups, input_is_parallel: bool = True,
                    sequence_parallel: bool = False) -> RowParallelLinear:
        if linear.bias is not None:
            raise ValueError("megamobi's linear layers have no bias")
        layer = cls(linear.in_features, linear.out_features, groups=groups, input_is_parallel=input_is_parallel,
                    sequence_parallel=sequence_parallel)
        with torch.no_grad():
            layer.weight.copy_(_local_slice(linear.weight, dim=1, rank=groups.tensor_rank, world=groups.layout.tensor))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.group)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(y, self.group)
        return reduce_from_tensor_parallel_region(y, self.group)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary, padded to a multiple of T with zero rows at the end.

    Rank r looks up the ids in [r*Vp/T, (r+1)*Vp/T), writes zeros for the others, and the ranks sum.
    Padded rows are never looked up (ids < vocab_size), so they never get a gradient.
    """

    partition_dim = 0

    def __init__(self, num_embeddings: int, embedding_dim: int, *, groups: ParallelGroups,
                 sequence_parallel: bool = False):
        super().__init__()
        world = groups.layout.tensor
        self.group = groups.tensor_group
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.full_size = num_embeddings
        self.sequence_parallel = sequence_parallel
        per_rank = padded_size(num_embeddings, world) // world
        self.vocab_start = groups.tensor_rank * per_rank
        self.vocab_end = self.vocab_start + per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim))
        mark_tensor_parallel(self.weight, partition_dim=0)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, *, groups: ParallelGroups,
                       sequence_parallel: bool = False) -> VocabParallelEmbedding:
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, groups=groups,
                    sequence_parallel=sequence_parallel)
        with torch.no_grad():
            layer.weight.copy_(_local_slice(embedding.weight, dim=0, rank=groups.tensor_rank, world=groups.layout.tensor))
        return layer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        world = _size(self.group)
        if self.sequence_parallel and ids.shape[SEQUENCE_DIM] % world:
            raise ConfigError(
                f"sequence parallelism splits the sequence over the {world} tensor-parallel ranks, but the "
                f"input has {ids.shape[SEQUENCE_DIM]} tokens per sequence; use a sequence length divisible by {world}")
        if world == 1:
            out = F.embedding(ids, self.weight)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out, self.group)
        return reduce_from_tensor_parallel_region(out, self.group)


# ---------------------------------------------------------------------------------------------
# Cross entropy over vocabulary-parallel logits
# ---------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[label] from logits split along the vocabulary, in fp32.

    Padded vocabulary columns (global index >= vocab_size) are set to -inf before the softmax, so
    they add nothing to the normaliser and get a zero gradient.
    """

    @staticmethod
    def forward(ctx, local_logits, labels, group, vocab_size):
        logits = local_logits.float()
        per_rank = logits.shape[-1]
        start = _rank(group) * per_rank
        pad_from = vocab_size - start  # local columns >= pad_from are padding
        if pad_from < per_rank:
            logits = logits.clone()
            logits[..., max(pad_from, 0):] = float("-inf")
        # Subtracting the global max keeps exp() finite; it cancels out of the loss.
        logits_max = logits.max(dim=-1).values
        if _size(group) > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        in_range = (labels >= start) & (labels < start + per_rank)
        local_labels = (labels - start).masked_fill(~in_range, 0)
        predicted = shifted.gather(-1, local_labels.unsqueeze(-1)).squeeze(-1).masked_fill(~in_range, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if _size(group) > 1:
            both = torch.stack([predicted, sum_exp])
            dist.all_reduce(both, group=group)
            predicted, sum_exp = both[0], both[1]
        loss = sum_exp.log() - predicted

        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local_labels, in_range)
        ctx.input_dtype = local_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_labels, in_range = ctx.saved_tensors
        grad = softmax  # d loss / d logit_j = softmax_j - [j == label]
        grad.scatter_add_(-1, local_labels.unsqueeze(-1), -in_range.unsqueeze(-1).to(grad.dtype))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, labels: torch.Tensor, *, group,
                                 vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy (fp32) from this rank's vocabulary slice of the logits.

    local_logits: [..., padded_vocab / T] (the output of a column-parallel lm_head without gather);
    labels: [...] global token ids. `group` is the tensor-parallel process group (None: one rank).
    Equals F.cross_entropy(full_logits[..., :vocab_size], labels), including ignore_index.
    """
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    per_token = _VocabParallelCrossEntropy.apply(local_logits, safe_labels, group, vocab_size)
    keep = (~ignored).float()
    return (per_token * keep).sum() / keep.sum()
