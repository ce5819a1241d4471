"""The learning-rate schedules, indexed by optimizer step: the paper's warmup + cosine, and warmup-stable-decay.

cosine (`optimizer.decay_style: cosine`, the default; the released MobiLlama / TinyLlama formula):
    lr(s) = lr * s / warmup                                    for s < warmup
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2     p = (s - warmup) / (total - warmup)
and min_lr from s = total on. Step s (0-based) trains with lr(s), so the last step (total - 1) runs just
above min_lr, by (lr - min_lr) * (1 - cos(pi / (total - warmup))) / 2.

wsd (`decay_style: wsd`, warmup-stable-decay as in MiniCPM, SmolLM, OLMo 2): the same warmup, then lr
held until the decay start step D, then
    lr(s) = min_lr + (lr - min_lr) * f((s - D) / (total - D))   for D <= s < total
with f the decay shape: linear 1 - p, cosine (1 + cos(pi p)) / 2, 1-sqrt 1 - sqrt(p) (Hägele et al.
2024). As with cosine, step s trains with lr(s), so the first decay step runs at lr and the last just
above min_lr. D comes from tokens by the rule every boundary uses (megamobi/data/stages.py): the first
step whose tokens consumed before it reach `decay_start_tokens`, or `run's tokens - decay_tokens`
(so a decay of decay_tokens covers floor(decay_tokens / tokens per step) steps, ending with the run).
Holding lr until a late D is what lets a run decide its length and its decay late (on resume, before D).

`step` counts every step taken, skipped ones too (their data was consumed), so the schedule is a pure
function of the step counter and a resume recomputes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megamobi.training.run_config import RunConfig

DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}
DEFAULT_DECAY_SHAPE = "linear"


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int,
                  decay_start_step: int | None = None, decay_shape: str = DEFAULT_DECAY_SHAPE) -> float:
    """lr at 0-based `step`: cosine when decay_start_step is None, else warmup-stable-decay."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    if decay_start_step is None:
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if step < decay_start_step:
        return lr
    progress = (step - decay_start_step) / (total_steps - decay_start_step)
    return min_lr + (lr - min_lr) * DECAY_SHAPES[decay_shape](progress)


def _tokens_per_step(batch: dict) -> int:
    return batch["global_batch_size"] * batch.get("seq_len", 2048)


def total_steps_of(record: dict) -> int:
    """The run's steps from a run config as a dict (RunConfig.total_steps, for recorded configs too)."""
    train, batch = record["train"], record["batch"]
    if train.get("steps") is not None:
        return train["steps"]
    return -(-train["tokens"] // _tokens_per_step(batch))


def wsd_decay_start_step(record: dict) -> int | None:
    """0-based first step of the wsd decay of a run config as a dict (None for cosine)."""
    o, batch = record["optimizer"], record["batch"]
    if o.get("decay_style", "cosine") != "wsd":
        return None
    tps = _tokens_per_step(batch)
    if o.get("decay_start_tokens") is not None:
        start_tokens = o["decay_start_tokens"]
    else:
        start_tokens = total_steps_of(record) * tps - (o.get("decay_tokens") or 0)
    return -(-start_tokens // tps)


@dataclasses.dataclass(frozen=True)
class LrSchedule:
    """A run's schedule, evaluated per step (what the trainer, --check-only and the planner print)."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    decay_start_step: int | None = None  # None: cosine
    decay_shape: str = DEFAULT_DECAY_SHAPE

    @classmethod
    def of_run(cls, run: RunConfig) -> LrSchedule:
        return cls.of_record(dataclasses.asdict(run))

    @classmethod
    def of_record(cls, record: dict) -> LrSchedule:
        """From a run config as a dict: a RunConfig's, or the one a checkpoint recorded."""
        o = record["optimizer"]
        return cls(lr=o["lr"], min_lr=o["min_lr"], warmup_steps=o["warmup_steps"], total_steps=total_steps_of(record),
                   decay_start_step=wsd_decay_start_step(record),
                   decay_shape=o.get("decay_shape") or DEFAULT_DECAY_SHAPE)

    @property
    def is_wsd(self) -> bool:
        return self.decay_start_step is not None

    def __call__(self, step: int) -> float:
        return learning_rate(step, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                             total_steps=self.total_steps, decay_start_step=self.decay_start_step,
                             decay_shape=self.decay_shape)

    def describe(self) -> str:
        """One line: the schedule's phases in 1-based steps, as logged."""
        warm = f"warmup {self.warmup_steps} steps to {self.lr:g}" if self.warmup_steps else f"lr {self.lr:g} from step 1"
        if self.decay_start_step is None:
            return f"lr: {warm}, then cosine to {self.min_lr:g} at step {self.total_steps:,}"
        held = f"held to step {self.decay_start_step:,}" if self.decay_start_step > self.warmup_steps else "no stable phase"
        return (f"lr: {warm}, {held}, then {self.decay_shape} decay over steps {self.decay_start_step + 1:,}-"
                f"{self.total_steps:,} ({self.total_steps - self.decay_start_step:,} steps) to {self.min_lr:g}")
