"""The paper's learning-rate schedule: linear warmup, then cosine decay reaching min_lr where the run ends.

Same formula as the released MobiLlama / TinyLlama scripts, indexed by optimizer step:
    lr(s) = lr * s / warmup                                    for s < warmup
    lr(s) = min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2     p = (s - warmup) / (total - warmup)
and min_lr from s = total on. Step s (0-based) trains with lr(s), so the last step (total - 1) runs just
above min_lr, by (lr - min_lr) * (1 - cos(pi / (total - warmup))) / 2. `step` counts every step taken, skipped ones too (their data was
consumed), so the schedule is a pure function of the step counter and a resume recomputes it.
"""

from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return lr * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
