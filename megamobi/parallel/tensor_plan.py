"""The tensor-parallel plan for MobiLlama, applied in place to a plain model (as torchtitan applies a
plan), plus the loss that goes with it and the layout checks that run before any group exists.

    attention   q/k/v column-parallel (split by heads), o row-parallel
    MLP         gate/up column-parallel, down row-parallel; the shared FFN is ONE module, so it
                is replaced once and every layer keeps calling the same (now parallel) module
    embedding   vocabulary-parallel (padded to a multiple of T)
    lm_head     column-parallel WITHOUT gather: each rank holds logits for its vocabulary slice,
                and `tensor_parallel_loss` computes the cross entropy across the slices
    norms       replicated (identical on every tensor rank: their inputs and grads are full)
"""

from __future__ import annotations

from typing import Callable

import torch

from megamobi.config_io import ConfigError
from megamobi.model import MLP, Attention, MobiLlama, language_model_loss
from megamobi.model_config import ModelConfig
from megamobi.parallel.groups import ParallelGroups
from megamobi.parallel.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validate_layout(model_config: ModelConfig, *, tensor: int, pipeline: int, world_size: int, zero_stage: int) -> None:
    """Refuse a parallel layout that cannot work, with a message that says what to change.

    Runs on the config alone (before torch.distributed or any group exists), so a bad layout
    fails on the login node instead of inside a SLURM allocation.
    """
    c = model_config
    if tensor < 1 or pipeline < 1:
        raise ConfigError(f"parallel.tensor and parallel.pipeline must be >= 1, got {tensor} and {pipeline}")
    if world_size % (tensor * pipeline):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor x pipeline = {tensor} x {pipeline}; "
            f"launch a multiple of {tensor * pipeline} processes or change parallel.tensor/pipeline")
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


def _replace_attention(attn: Attention, groups: ParallelGroups) -> None:
    T = groups.layout.tensor
    attn.q_proj = ColumnParallelLinear.from_linear(attn.q_proj, groups=groups)
    attn.k_proj = ColumnParallelLinear.from_linear(attn.k_proj, groups=groups)
    attn.v_proj = ColumnParallelLinear.from_linear(attn.v_proj, groups=groups)
    attn.o_proj = RowParallelLinear.from_linear(attn.o_proj, groups=groups)
    # q/k/v rows are head-major, so a contiguous row slice is a contiguous block of whole heads.
    attn.num_heads //= T
    attn.num_kv_heads //= T


def _replace_mlp(mlp: MLP, groups: ParallelGroups) -> None:
    mlp.gate_proj = ColumnParallelLinear.from_linear(mlp.gate_proj, groups=groups)
    mlp.up_proj = ColumnParallelLinear.from_linear(mlp.up_proj, groups=groups)
    mlp.down_proj = RowParallelLinear.from_linear(mlp.down_proj, groups=groups)


def apply_tensor_parallel(model: MobiLlama, groups: ParallelGroups) -> MobiLlama:
    """Rewrite a plain MobiLlama (built identically on every rank) to hold only this tensor rank's
    shards. In place; returns the model. With T = 1 the model is left untouched."""
    T = groups.layout.tensor
    if T == 1:
        return model
    c = model.config
    validate_layout(c, tensor=T, pipeline=1, world_size=T, zero_stage=1)
    for layer in model.layers:
        _replace_attention(layer.self_attn, groups)
    for mlp in model.mlps:  # one module when shared: replaced once, still called by every layer
        _replace_mlp(mlp, groups)
    model.embed_tokens = VocabParallelEmbedding.from_embedding(model.embed_tokens, groups=groups)
    # Local vocabulary logits, no gather: pair with tensor_parallel_loss. The padded rows are zero
    # and their logits are masked out of the softmax.
    model.lm_head = ColumnParallelLinear.from_linear(model.lm_head, groups=groups, pad_output=True)
    return model


def tensor_parallel_loss(groups: ParallelGroups, vocab_size: int) -> LossFn:
    """(local_logits, labels) -> mean fp32 cross entropy. With T = 1 this IS language_model_loss."""
    if groups.layout.tensor == 1:
        return language_model_loss
    group = groups.tensor_group

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, group=group, vocab_size=vocab_size)

    return loss_fn
