"""The one entry point the training driver calls: a parallel MobiLlama for this rank's groups."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from megamobi.model import MobiLlama
from megamobi.model_config import ModelConfig, checkpointing_mode
from megamobi.parallel.groups import ParallelGroups
from megamobi.parallel.pipeline import PIPELINE_DS_CONFIG, build_pipeline_module
from megamobi.parallel.tensor_plan import LossFn, apply_tensor_parallel, tensor_parallel_loss


@dataclasses.dataclass
class ParallelModel:
    """module: a tensor-parallel MobiLlama (P == 1) or a DeepSpeed PipelineModule (P > 1).

    P == 1: deepspeed.initialize(model=module, optimizer=..., config=cfg, mpu=groups); then
            loss = loss_fn(engine(input_ids), labels); engine.backward(loss); engine.step().
    P > 1:  merge ds_config_overrides into cfg; deepspeed.initialize(model=module, optimizer=...,
            config=cfg) WITHOUT mpu (the topology is inside); loss = engine.train_batch(iter) where
            the iterator yields (input_ids, labels) micro-batches; loss_fn runs on the last stage.
    """

    module: nn.Module
    loss_fn: LossFn
    is_pipeline: bool
    ds_config_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


def build_parallel_model(model_config: ModelConfig, groups: ParallelGroups, *, seed: int,
                         partition_method: str = "parameters", activation_checkpointing: bool | str = "none",
                         sequence_parallel: bool = False) -> ParallelModel:
    """Initialised exactly like `torch.manual_seed(seed); MobiLlama(model_config)` whatever the layout.

    sequence_parallel: Megatron-style sequence parallelism on top of tensor parallelism (needs
    T >= 2 and a sequence length divisible by T); see `apply_tensor_parallel`.
    activation_checkpointing: "none", "full" or "selective" (true / false: full / none); overrides
    the model config's own setting when not "none"."""
    mode = checkpointing_mode(activation_checkpointing)
    if mode == "none":
        mode = model_config.activation_checkpointing
    loss_fn = tensor_parallel_loss(groups, model_config.vocab_size)
    if groups.layout.pipeline > 1:
        module = build_pipeline_module(model_config, groups, seed=seed, partition_method=partition_method,
                                       activation_checkpointing=mode,
                                       sequence_parallel=sequence_parallel)
        return ParallelModel(module=module, loss_fn=loss_fn, is_pipeline=True,
                             ds_config_overrides=dict(PIPELINE_DS_CONFIG))
    torch.manual_seed(seed)
    if mode != model_config.activation_checkpointing:
        model_config = dataclasses.replace(model_config, activation_checkpointing=mode)
    model = apply_tensor_parallel(MobiLlama(model_config), groups, sequence_parallel=sequence_parallel)
    return ParallelModel(module=model, loss_fn=loss_fn, is_pipeline=False)
