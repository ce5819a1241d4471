"""Healthy checkpoints: a checkpoint holds only weights that the steps since the previous one vouch for.

A step is *unhealthy* when its loss or its gradient norm is not finite. Its update is refused
(FiniteStepAdamW), so the weights stay as they were, but it casts doubt on them: a resume at
optimizer.lr=1e3 applies one finite but ruinous update, and every step after it has an infinite
gradient norm. So from an unhealthy step on, the weights are *in question* until a later step runs on
them (the refused update left them unchanged) with a finite loss and gradient norm: then the fault
belonged to a batch (bad data, whether or not train.divergence judged it so) or was transient, not to the
weights. A finite loss spike refused by train.divergence.spike_factor is not unhealthy (both values are
finite): the divergence policy deals with it.

While the weights are in question:
- a checkpoint that falls due is postponed to the end of the step that clears the question (one line);
- a save that cannot wait (the run's last step, a signal) is not written: the run stops with exit 3,
  naming the first unhealthy step, which value was not finite, and the newest healthy checkpoint;
- a rewind (train.divergence.action: rewind) restores a healthy checkpoint: the question is gone.

Every checkpoint's manifest records the loss and gradient norm of its own last step, `healthy: true`
and the unhealthy steps its interval cleared (`non_finite_steps`). Pruning (checkpoint.keep_last)
deletes only checkpoints older than the newest healthy one that it verified (checksums) and that are
healthy; it never deletes the newest healthy one, and a broken or unhealthy checkpoint is neither
counted nor deleted (docs/training.md "Healthy checkpoints").
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any


def _finite(value: float | None) -> bool:
    return value is None or math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class BadStep:
    step: int
    loss: float
    grad_norm: float | None

    def what(self) -> str:
        """Which value was not finite, never calling a finite one non-finite."""
        loss_ok, norm_ok = _finite(self.loss), _finite(self.grad_norm)
        if not loss_ok and not norm_ok:
            return f"step {self.step}: its loss ({self.loss}) and its gradient norm ({self.grad_norm}) were not finite"
        if not loss_ok:
            norm = "no gradient norm" if self.grad_norm is None else f"its gradient norm, {self.grad_norm:.4g}, was finite"
            return f"step {self.step}: its loss was {self.loss} ({norm})"
        return f"step {self.step}: its gradient norm was {self.grad_norm} (its loss, {self.loss:.6g}, was finite)"


class IntervalHealth:
    """The health of the weights in memory since the newest healthy checkpoint (the same on every rank:
    the loss and the gradient norm it is given are global)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """At a save, a resume or a rewind: the weights are those of a healthy checkpoint."""
        self.in_question: BadStep | None = None  # the first unhealthy step not yet cleared
        self.cleared: list[int] = []  # this interval's unhealthy steps (all cleared by the time a save is allowed)
        self.last: tuple[float, float | None] | None = None  # the newest step's loss and gradient norm
        self.postponed = False

    def record(self, step: int, *, loss: float, grad_norm: float | None) -> str | None:
        """After every step that is kept (not undone by a rewind). A line to log when the question is cleared."""
        self.last = (loss, grad_norm)
        if not (_finite(loss) and _finite(grad_norm)):
            if self.in_question is None:
                self.in_question = BadStep(step, loss, grad_norm)
            self.cleared.append(step)
            return None
        if self.in_question is None:
            return None
        first, self.in_question = self.in_question, None
        return (f"step {step} ran cleanly on the weights in question since {first.what()}: the fault was that "
                f"step's batch or transient, not the weights'")

    @property
    def healthy(self) -> bool:
        return self.in_question is None

    def postpone(self, step: int) -> str | None:
        """A checkpoint fell due while the weights are in question: it waits. The line to log, once."""
        if self.postponed:
            return None
        self.postponed = True
        return (f"checkpoint due at step {step} postponed: the weights are in question since {self.in_question.what()}; "
                "it is written after the first step that runs cleanly on them")

    def stop_message(self, *, step: int, newest_healthy: Path | None, why: str) -> str:
        """The exit-3 message when a save cannot be written (or the run must stop) while in question."""
        where = (f"the newest healthy checkpoint is {newest_healthy}: fix the cause (e.g. a lower optimizer.lr, the data), "
                 "then run the same command to resume from it" if newest_healthy is not None
                 else "there is no healthy checkpoint to resume from (the run starts over)")
        return (f"stopped at step {step} ({why}) without writing a checkpoint: the weights are in question since "
                f"{self.in_question.what()}, and no step since ran cleanly on them; {where}")

    def manifest_info(self) -> dict[str, Any]:
        """The health record of the checkpoint about to be written (only when healthy)."""
        loss, grad_norm = self.last if self.last is not None else (None, None)
        return {"loss": loss, "grad_norm": grad_norm, "healthy": True, "non_finite_steps": list(self.cleared)}


def manifest_health_problem(manifest: dict) -> str | None:
    """Why a checkpoint's own record says it is not healthy, or None. Checkpoints written before this
    record existed count as healthy when their recorded loss is finite."""
    if manifest.get("healthy") is False:
        return "its manifest records it as unhealthy"
    for key in ("loss", "grad_norm"):
        value = manifest.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return f"its manifest records a non-finite {key.replace('_', ' ')} ({value})"
    return None


_verified: set[tuple[Path, int]] = set()  # (checkpoint, manifest mtime): verified by this process


def _healthy_and_verified(checkpoint: Path) -> bool:
    from megamobi.checkpointing.manifest import MANIFEST_NAME, read_manifest, verify_checkpoint

    try:
        key = (checkpoint.resolve(), (checkpoint / MANIFEST_NAME).stat().st_mtime_ns)
        if key in _verified:
            return True
        if manifest_health_problem(read_manifest(checkpoint)) is not None or verify_checkpoint(checkpoint):
            return False
    except (OSError, ValueError):
        return False
    _verified.add(key)
    return True


def checkpoints_to_prune(checkpoints: list[Path], *, newest_healthy: Path, keep_last: int,
                         protect: set[Path]) -> list[Path]:
    """Of `checkpoints` (oldest first), those keep_last says to delete: older than `newest_healthy`,
    beyond the newest keep_last healthy ones (newest_healthy included), healthy and verified, not protected.
    A checkpoint newer than newest_healthy, broken, or unhealthy is neither counted nor deleted (someone
    may want to look at it; docs/training.md)."""
    newest = newest_healthy.resolve()
    older = [c for c in checkpoints if c.name < newest_healthy.name and c.resolve() != newest]
    kept, doomed = 1, []  # newest_healthy counts as the first kept
    for candidate in reversed(older):
        if not _healthy_and_verified(candidate):
            continue
        if kept < keep_last:
            kept += 1
        elif candidate.resolve() not in protect:
            doomed.append(candidate)
    return doomed


def prune(checkpoints: list[Path], *, newest_healthy: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    doomed = checkpoints_to_prune(checkpoints, newest_healthy=newest_healthy, keep_last=keep_last, protect=protect)
    for old in doomed:
        shutil.rmtree(old)
    return doomed
