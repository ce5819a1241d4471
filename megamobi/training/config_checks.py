"""Run-config checks beyond the basic ones in RunConfig.validate(): values that would otherwise pass
`--check-only` and then fail on every rank with a traceback, or silently do something else.

Pure config only (no files): called from RunConfig.validate(). Checks that read the run directory or
a checkpoint live in megamobi.training.preflight.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from megamobi.config_io import ConfigError

if TYPE_CHECKING:
    from megamobi.training.run_config import RunConfig

# The classes of the pipeline pieces (megamobi/parallel/pipeline_stages.py) that DeepSpeed's
# `type:<regex>` partitioning matches against (case-insensitive search).
PIPELINE_PIECE_CLASSES = ("EmbeddingPipe", "AttentionBlockPipe", "MLPBlockPipe", "HeadPipe")
PARTITION_METHODS = ("parameters", "uniform", "type:<regex>")

# deepspeed: pass-through keys that megamobi always generates from the run config, and where each
# comes from: a different value there would make DeepSpeed train something other than the run config says.
GENERATED_DS_KEYS = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.global_batch_size / (micro_batch_size x data-parallel size)",
    "gradient_clipping": "optimizer.clip_grad",
    "zero_optimization.stage": "parallel.zero_stage",
    "bf16.enabled": "precision",
}
# Keys megamobi owns entirely: its own AdamW and learning-rate schedule, and no fp16 loss scaling.
FORBIDDEN_DS_KEYS = {
    "optimizer": "megamobi passes its own AdamW; set the optimizer: section instead",
    "scheduler": "megamobi sets the learning rate itself; set optimizer.lr / min_lr / warmup_steps instead",
    "fp16": "megamobi supports precision bf16 or fp32, not fp16",
}


def validate_run_details(run: RunConfig, *, world_size: int | None) -> None:
    """Raise ConfigError naming the key and what to do; `world_size` adds the DeepSpeed comparison."""
    _check_keep_last(run.checkpoint.keep_last)
    _check_partition_method(run.parallel.partition_method)
    _check_optimizer(run)
    _check_validation(run)
    _check_deepspeed_keys(run, world_size=world_size)


def _check_keep_last(keep_last: Any) -> None:
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"checkpoint.keep_last {keep_last}: must be at least 1 (the newest checkpoints kept), "
                          "or null / left out to keep every checkpoint")


def _check_partition_method(method: str) -> None:
    lowered = method.lower()
    if lowered in ("parameters", "uniform"):
        return
    if lowered.startswith("type:"):
        pattern = method.split(":", 1)[1]
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as err:
            raise ConfigError(f"parallel.partition_method {method!r}: {pattern!r} is not a valid regular expression "
                              f"({err})") from None
        if not any(regex.search(name) for name in PIPELINE_PIECE_CLASSES):
            raise ConfigError(f"parallel.partition_method {method!r} matches none of the pipeline pieces "
                              f"({', '.join(PIPELINE_PIECE_CLASSES)}); e.g. use 'type:AttentionBlockPipe'")
        return
    raise ConfigError(f"parallel.partition_method {method!r} is unknown; use one of {', '.join(PARTITION_METHODS)}")


def _check_optimizer(run: RunConfig) -> None:
    o = run.optimizer
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optimizer.betas {list(o.betas)}: give two numbers in [0, 1), e.g. [0.9, 0.95]")
    if o.eps <= 0:
        raise ConfigError(f"optimizer.eps {o.eps} must be positive")
    if o.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay {o.weight_decay} must not be negative")


def _check_validation(run: RunConfig) -> None:
    t = run.train
    if t.eval_interval < 0:
        raise ConfigError(f"train.eval_interval {t.eval_interval} must be 0 (no validation) or positive")
    if t.eval_samples < 0:
        raise ConfigError(f"train.eval_samples {t.eval_samples} must not be negative")
    for stage in run.data_stages if t.eval_interval > 0 else ():  # each stage validates on its own split
        if stage.val_fraction == 0:
            key = f"{stage.key}.val_fraction"
            raise ConfigError(f"train.eval_interval {t.eval_interval} asks for validation but {key} is 0 "
                              f"(no validation split): set {key} (e.g. 0.01), or train.eval_interval: 0")
    if t.eval_interval > 0 and t.eval_samples == 0:
        raise ConfigError(f"train.eval_interval {t.eval_interval} asks for validation but train.eval_samples is 0: "
                          "set train.eval_samples (e.g. 64), or train.eval_interval: 0")


def _leaves(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_deepspeed_keys(run: RunConfig, *, world_size: int | None) -> None:
    for key, why in FORBIDDEN_DS_KEYS.items():
        if key in run.deepspeed:
            raise ConfigError(f"deepspeed.{key}: not allowed as a pass-through key: {why}")
    given = _leaves(run.deepspeed)
    if world_size is None:
        # Without the world size only the keys that do not depend on it can be compared.
        world_size = run.parallel.tensor * run.parallel.pipeline
        given.pop("gradient_accumulation_steps", None)
    from megamobi.training.ds_config import build_ds_config

    generated = _leaves(build_ds_config(run, world_size=world_size, passthrough=False))
    generated.setdefault("bf16.enabled", False)
    for key, source in GENERATED_DS_KEYS.items():
        if key in given and given[key] != generated.get(key):
            raise ConfigError(f"deepspeed.{key} {given[key]!r} contradicts the run config ({source} gives "
                              f"{generated.get(key)!r}); remove it from the deepspeed: section and set {source.split()[0]}")
