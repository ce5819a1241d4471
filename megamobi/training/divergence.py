"""Divergence: what a bad step is, and the guard that keeps its update out of the weights.

    train:
      divergence:
        action: rewind      # skip (default) | stop | rewind
        spike_factor: 3.0   # a loss above 3 x the median of the last `window` steps is a spike (0: off)
        window: 100
        max_rewinds: 3      # rewinds in one launch before the run stops, saying why

A step is bad when its loss or gradient norm is not finite, or (spike_factor > 0, once `window` losses
are known) its loss exceeds spike_factor x their median. Every mode refuses a bad step's update before
it touches the weights: `StepGuard` gives FiniteStepAdamW the step's loss (summed over the ranks in
the same all-reduce as its non-finite-gradient flag) and the spike limit. What follows depends on
`action` (megamobi/training/recovery.py): skip it and go on (train.max_bad_steps in a row stop the
run), stop at once (exit 3), or rewind to the newest healthy checkpoint and re-run (docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Literal

import torch

from megamobi.config_io import ConfigError


class NonFiniteLossError(RuntimeError):
    """Training stops on a bad step it cannot recover from (exit status 3)."""


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
    action: Literal["skip", "stop", "rewind"] = "skip"
    spike_factor: float = 0.0  # 0: no spike detection
    window: int = 100
    max_rewinds: int = 3

    def validate(self) -> None:
        if not (self.spike_factor == 0 or 1 < self.spike_factor < float("inf")):
            raise ConfigError(f"train.divergence.spike_factor {self.spike_factor} must be 0 (off) or a number above 1 "
                              "(a loss above spike_factor x the recent median is a spike)")
        if self.window < 1:
            raise ConfigError(f"train.divergence.window {self.window} must be at least 1 (steps)")
        if self.max_rewinds < 1:
            raise ConfigError(f"train.divergence.max_rewinds {self.max_rewinds} must be at least 1; "
                              "use train.divergence.action: stop to never rewind")


class LossWindow:
    """The losses of the last `window` steps whose update was applied; the spike limit they imply."""

    def __init__(self, config: DivergenceConfig, recent: list[float] = ()):
        self.config = config
        self.losses: deque[float] = deque(recent, maxlen=config.window)

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def limit(self) -> float:
        if not self.config.spike_factor or len(self.losses) < self.config.window:
            return math.inf
        return self.config.spike_factor * statistics.median(self.losses)


class StepGuard:
    """One step's evidence for FiniteStepAdamW: the sum and count of this rank's micro-batch losses
    (none on pipeline stages without the loss), the spike limit, and a refusal decided beforehand
    (a step already judged bad data)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, *, limit: float = math.inf, forced: str | None = None) -> None:
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_count = 0
        self.limit = limit
        self.forced = forced

    def add_loss(self, value: torch.Tensor) -> None:
        self.loss_sum = self.loss_sum + value.detach().float().reshape(())
        self.loss_count += 1

    def local_mean(self) -> float | None:
        return float(self.loss_sum) / self.loss_count if self.loss_count else None

    def refusal(self, *, bad_gradient: bool, loss: float | None) -> str | None:
        """Why the update must not be applied; None when it may."""
        if self.forced:
            return self.forced
        if loss is not None and not math.isfinite(loss):
            return "non-finite loss"
        if bad_gradient:
            return "non-finite gradient"
        if loss is not None and loss > self.limit:
            return f"loss spike ({loss:.4g} > {self.limit:.4g})"
        return None


def newest_healthy_checkpoint(run_dir: str | Path, *, before_step: int) -> Path | None:
    """The newest checkpoint of run_dir before `before_step` that passes its checksums and whose manifest's
    health record (megamobi/training/interval_health.py) says healthy: what a rewind restores, and what a
    stopped run names to resume from."""
    from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest, verify_checkpoint
    from megamobi.training.interval_health import manifest_health_problem

    for candidate in reversed(complete_checkpoints(run_dir)):
        try:
            manifest = read_manifest(candidate)
        except (OSError, ValueError):
            continue
        step = manifest.get("step")
        if not isinstance(step, int) or step >= before_step:
            continue
        if manifest_health_problem(manifest) is not None:
            continue
        if not verify_checkpoint(candidate):
            return candidate
    return None
