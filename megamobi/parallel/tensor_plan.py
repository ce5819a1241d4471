"""The tensor-parallel plan for MobiLlama, applied in place to a plain model (as torchtitan applies a
plan), plus the loss that goes with it and the layout checks that run before any group exists.

    attention   q/k/v column-parallel (split by heads), o row-parallel
    MLP         gate/up column-parallel, down row-parallel; the shared FFN is ONE module, so it
                is replaced once and every layer keeps calling the same (now parallel) module
    embedding   vocabulary-parallel (padded to a multiple of T)
    lm_head     column-parallel WITHOUT gather: each rank holds logits for its vocabulary slice,
                and `tensor_parallel_loss` computes the cross entropy across the slices
    norms       replicated (identical on every tensor rank: their inputs and grads are full)

With sequence_parallel=True (Megatron's sequence parallelism) the residual stream between the
tensor-parallel regions is split along the sequence instead of replicated:

    embedding   reduce-scatter to this rank's sequence chunk (instead of all-reduce)
    norms, residual adds      on the local chunk [batch, seq/T, hidden]
    attention / MLP input     all-gathered once per block (a forward pre-hook; q/k/v and gate/up
                              are `input_is_gathered`), so Attention.forward sees the full sequence
                              and the full-length rotary tables fit; backward: reduce-scatter
    o / down    reduce-scatter to the sequence chunk (instead of all-reduce)
    lm_head     gathers the sequence on input; its output stays vocabulary-parallel
    norm grads  summed over the tensor group by a gradient hook (`mark_sequence_parallel`)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megamobi.config_io import ConfigError
from megamobi.model import MLP, Attention, MobiLlama, RMSNorm, language_model_loss
from megamobi.model_config import ModelConfig
from megamobi.parallel.groups import Layout, ParallelGroups
from megamobi.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
    sequence_gather_pre_hook,
    vocab_parallel_cross_entropy,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validate_layout(model_config: ModelConfig, *, tensor: int, pipeline: int, world_size: int, zero_stage: int,
                    sequence_parallel: bool = False, seq_len: int | None = None) -> None:
    """Refuse a parallel layout that cannot work, with a message that says what to change.

    sequence_parallel: also check that T > 1 and, when `seq_len` is given, that T divides it.

    Runs on the config alone (before torch.distributed or any group exists), so a bad layout
    fails on the login node instead of inside a SLURM allocation.
    """
    c = model_config
    Layout.for_world(world_size=world_size, tensor=tensor, pipeline=pipeline)  # sizes >= 1, world divisible
    for what, value in (("num_attention_heads", c.num_attention_heads), ("num_key_value_heads", c.kv_heads),
                        ("intermediate_size", c.intermediate_size)):
        if value % tensor:
            raise ConfigError(
                f"model {c.name}: {what} = {value} is not divisible by parallel.tensor = {tensor}; "
                f"tensor parallelism splits attention by heads and the FFN by its intermediate size")
    if c.vocab_size < tensor:
        raise ConfigError(f"model {c.name}: vocab_size {c.vocab_size} is smaller than parallel.tensor = {tensor}")
    if pipeline > c.num_layers:
        raise ConfigError(
            f"model {c.name} has {c.num_layers} layers, fewer than parallel.pipeline = {pipeline} stages; "
            f"use at most {c.num_layers} pipeline stages")
    if pipeline > 1 and zero_stage != 1:
        if zero_stage in (2, 3):
            why = "DeepSpeed's pipeline engine allows ZeRO stage 0 or 1 only (it reduces gradients itself)"
        else:
            why = ("ZeRO-0 with a pipeline is broken in DeepSpeed 0.19.8: the clipping norm counts only "
                   "stage 0's parameters, and bf16 checkpoints fail to load")
        raise ConfigError(f"zero_stage {zero_stage} with parallel.pipeline = {pipeline}: {why}; set zero_stage: 1")
    if sequence_parallel:
        validate_sequence_parallel(tensor=tensor, seq_len=seq_len)


def validate_sequence_parallel(*, tensor: int, seq_len: int | None) -> None:
    """Sequence parallelism needs T >= 2 and, when seq_len is given, T dividing it (ConfigError)."""
    if tensor == 1:
        raise ConfigError("parallel.sequence_parallel with parallel.tensor = 1: sequence parallelism splits the "
                          "sequence over the tensor-parallel ranks, so it needs parallel.tensor >= 2")
    if seq_len is not None and seq_len % tensor:
        raise ConfigError(f"parallel.sequence_parallel: sequence length {seq_len} is not divisible by "
                          f"parallel.tensor = {tensor}; pick a seq_len that is a multiple of {tensor}")


def _gather_sequence_on_input(block, groups: ParallelGroups) -> None:
    # One all-gather per block (Megatron gathers once for its fused QKV / fc1), done before the
    # block's forward so that the plain Attention.forward sees the full sequence: it reshapes with
    # the input's length, and MobiLlama.forward slices the rotary tables by the full length.
    block.register_forward_pre_hook(sequence_gather_pre_hook(groups.tensor_group))


def _replace_attention(attn: Attention, groups: ParallelGroups, sequence_parallel: bool) -> None:
    T = groups.layout.tensor
    col = {"groups": groups, "input_is_gathered": sequence_parallel}
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, **col)
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, **col)
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, **col)
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, groups=groups, sequence_parallel=sequence_parallel)
    # q/k/v rows are head-major, so a contiguous row slice is a contiguous block of whole heads.
    attn.num_heads //= T
    attn.num_kv_heads //= T
    if sequence_parallel:
        _gather_sequence_on_input(attn, groups)


def _replace_mlp(mlp: MLP, groups: ParallelGroups, sequence_parallel: bool) -> None:
    col = {"groups": groups, "input_is_gathered": sequence_parallel}
    mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, **col)
    mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, **col)
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, groups=groups, sequence_parallel=sequence_parallel)
    if sequence_parallel:
        _gather_sequence_on_input(mlp, groups)


def apply_tensor_parallel(model: MobiLlama, groups: ParallelGroups, *, sequence_parallel: bool = False) -> MobiLlama:
    """Rewrite a plain MobiLlama (built identically on every rank) to hold only this tensor rank's
    shards. In place; returns the model. With T = 1 the model is left untouched.

    sequence_parallel: shard the residual stream (embedding output, norms, residual adds) along the
    sequence between the tensor-parallel regions (see the module docstring). The model's forward is
    unchanged; its input length must be divisible by T (ConfigError from the embedding otherwise).
    """
    T = groups.layout.tensor
    if sequence_parallel:
        validate_sequence_parallel(tensor=T, seq_len=None)
    if T == 1:
        return model
    c = model.config
    validate_layout(c, tensor=T, pipeline=1, world_size=T, zero_stage=1)
    sp = sequence_parallel
    for layer in model.layers:
        _replace_attention(layer.self_attn, groups, sp)
    for mlp in model.mlps:  # one module when shared: replaced once, still called by every layer
        _replace_mlp(mlp, groups, sp)
    model.embed_tokens = VocabParallelEmbedding.from_embedding(model.embed_tokens, groups=groups, sequence_parallel=sp)
    # Local vocabulary logits, no gather: pair with tensor_parallel_loss. The padded rows are zero
    # and their logits are masked out of the softmax.
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, groups=groups, pad_output=True, sequence_parallel=sp)
    if sp:
        # Replicated norm weights now see only this rank's sequence chunk: sum their grads over T.
        for module in model.modules():
            if isinstance(module, RMSNorm):
                mark_sequence_parallel(module.weight, groups.tensor_group)
    return model


def tensor_parallel_loss(groups: ParallelGroups, vocab_size: int) -> LossFn:
    """(local_logits, labels) -> mean fp32 cross entropy. With T = 1 this IS language_model_loss."""
    if groups.layout.tensor == 1:
        return language_model_loss
    group = groups.tensor_group

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, group=group, vocab_size=vocab_size)

    return loss_fn
