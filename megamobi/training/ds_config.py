"""The DeepSpeed config, generated from the run config so the two can never disagree."""

from __future__ import annotations

from typing import Any

from megamobi.training.run_config import RunConfig


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_ds_config(run: RunConfig, *, world_size: int, passthrough: bool = True) -> dict[str, Any]:
    """passthrough=False: without the run's `deepspeed:` keys (to compare them with what is generated)."""
    b = run.batch
    config: dict[str, Any] = {
        "train_batch_size": b.global_batch_size,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": run.accumulation_steps(world_size),
        # DeepSpeed clips at 1.0 when this is absent; always say it.
        "gradient_clipping": run.optimizer.clip_grad,
        "zero_optimization": {"stage": run.parallel.zero_stage},
        # We pass our own torch AdamW (DeepSpeed's CPU Adam JIT-compiles for ~100 s on CPU).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # megamobi logs its own line per step
        "wall_clock_breakdown": False,
    }
    if run.precision == "bf16":
        # check_grad_overflow: DeepSpeed also refuses non-finite bf16 steps, like our optimizer guard.
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
        if run.parallel.zero_stage == 1:
            # Accumulate gradients in fp32 (DeepSpeed's BF16_Optimizer): micro-batches add up without
            # bf16 rounding, and in pipelines the shared FFN's replica gradients are all-reduced over
            # the tie group in fp32, not bf16.
            config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(config, run.deepspeed) if passthrough else config
