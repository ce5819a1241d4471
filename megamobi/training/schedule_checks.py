"""The wsd schedule's config checks, and what a resume may change about the learning-rate schedule.

Config (RunConfig.validate): decay_shape / decay_tokens / decay_start_tokens only with decay_style
wsd, exactly one of the two token settings, a decay of at least one global batch that starts after the
warmup and before the run's end.

Resume (`schedule_changes`): the checkpoint's recorded schedule is compared with the run's. A wsd run
holds its lr until the decay starts, so before that step its length, its decay start, shape and min_lr
may all change without touching any step already taken or the next one: such a change is accepted and
recorded (the log, metrics.jsonl `schedule_change`, the checkpoints' `schedule_changes`). Once the decay
has begun (or when lr / warmup / the decay style change) a different schedule would rewrite the lr of
the steps to come mid-decay: refused with the old and new values unless
`optimizer.allow_schedule_change: true` (then recorded). A cosine schedule has no such stable phase:
its lr at every step is a function of lr, min_lr, warmup_steps and the run's steps, so any change
(a finished 40-step run resumed with train.steps=50 would jump from min_lr back up to ~lr/2) is refused
the same way, naming the lr the next step would get under each schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from megamobi.config_io import ConfigError
from megamobi.training.schedule import LrSchedule

if TYPE_CHECKING:
    from megamobi.training.run_config import RunConfig

ALLOW_KEY = "optimizer.allow_schedule_change"
WSD_KEYS = ("decay_shape", "decay_tokens", "decay_start_tokens")


def validate_schedule(run: RunConfig) -> None:
    o = run.optimizer
    if o.decay_style != "wsd":
        for key in WSD_KEYS:
            if getattr(o, key) is not None:
                raise ConfigError(f"optimizer.{key} applies to decay_style: wsd; this run's decay_style is "
                                  f"{o.decay_style} (set optimizer.decay_style: wsd, or remove optimizer.{key})")
        return
    if (o.decay_tokens is None) == (o.decay_start_tokens is None):
        raise ConfigError("optimizer.decay_style wsd: give exactly one of optimizer.decay_tokens (the decay's length, "
                          "ending with the run) and optimizer.decay_start_tokens (where it starts)")
    tps, total = run.tokens_per_step, run.total_steps
    if o.decay_tokens is not None and o.decay_tokens < tps:
        raise ConfigError(f"optimizer.decay_tokens {o.decay_tokens} must be at least one global batch "
                          f"({tps:,} tokens = batch.global_batch_size x batch.seq_len)")
    if o.decay_tokens is not None and o.decay_tokens > total * tps:
        raise ConfigError(f"optimizer.decay_tokens {o.decay_tokens:,} is longer than the run ({total * tps:,} tokens, "
                          f"{total:,} steps)")
    if o.decay_start_tokens is not None and o.decay_start_tokens < 0:
        raise ConfigError(f"optimizer.decay_start_tokens {o.decay_start_tokens} must not be negative")
    start = LrSchedule.of_run(run).decay_start_step
    if start >= total:
        raise ConfigError(f"optimizer.decay_start_tokens {o.decay_start_tokens:,} is at or past the run's end "
                          f"({total * tps:,} tokens, {total:,} steps): the decay would never start")
    if start < o.warmup_steps:
        which = (f"decay_tokens {o.decay_tokens:,}" if o.decay_tokens is not None
                 else f"decay_start_tokens {o.decay_start_tokens:,}")
        raise ConfigError(f"optimizer.{which} starts the decay at step {start + 1:,}, inside the warmup "
                          f"(optimizer.warmup_steps {o.warmup_steps:,}): shorten the decay or the warmup")


def _fields(schedule: LrSchedule) -> dict[str, Any]:
    start = schedule.decay_start_step
    return {"decay style": "wsd" if schedule.is_wsd else "cosine", "optimizer.lr": schedule.lr,
            "optimizer.min_lr": schedule.min_lr, "optimizer.warmup_steps": schedule.warmup_steps,
            "steps": schedule.total_steps, "decay start step": None if start is None else start + 1,
            "decay shape": schedule.decay_shape if schedule.is_wsd else None}


def schedule_changes(manifest: dict, run: RunConfig) -> tuple[list[str], str | None]:
    """(what differs, why it is refused or None when it may be accepted) between the schedule a
    checkpoint trained under and the run's. Empty when the same."""
    recorded = manifest.get("run_config") or {}
    if "optimizer" not in recorded or "train" not in recorded or "batch" not in recorded:
        return [], None  # a weights-only checkpoint (convert from-hf): no schedule to continue
    old, new = LrSchedule.of_record(recorded), LrSchedule.of_run(run)
    if old == new:
        return [], None
    before, after = _fields(old), _fields(new)
    changes = [f"{key}: {before[key]} -> {after[key]}" for key in before if before[key] != after[key]]
    step = manifest.get("step", 0)
    if not (old.is_wsd or new.is_wsd):
        # `step` steps were taken (0-based 0..step-1): the next one is step `step`, logged as step + 1.
        return changes, (f"a cosine schedule's lr depends on all of these at every step: the next step ({step + 1:,}) "
                         f"would run at lr {new(step):.4g} instead of {old(step):.4g}")
    if not (old.is_wsd and new.is_wsd):
        return changes, "the decay style changed, which changes the lr of the steps to come"
    if (old.lr, old.warmup_steps) != (new.lr, new.warmup_steps):
        return changes, "lr / warmup_steps changed, which changes the lr of steps taken (or the next)"
    # `step` steps were taken (0-based 0..step-1): the decay began once its first step was among them. A new
    # start at the very next step is fine (a decay's first step runs at lr); one before it would jump down.
    if step > old.decay_start_step:
        return changes, f"the decay began at step {old.decay_start_step + 1:,} (this checkpoint is at step {step:,})"
    if step > new.decay_start_step:
        return changes, (f"the new decay start (step {new.decay_start_step + 1:,}) is not after the checkpoint's step "
                         f"{step:,}: the lr would jump down")
    return changes, None


def refuse_or_accept(changes: list[str], why: str | None, *, run: RunConfig, checkpoint: Path) -> None:
    if changes and why is not None and not run.optimizer.allow_schedule_change:
        raise ConfigError(
            f"resuming from {checkpoint} with another learning-rate schedule: {'; '.join(changes)}. Refused because "
            f"{why}. Restore the checkpoint's schedule, or set {ALLOW_KEY}: true to continue anyway (recorded)")


def check_resume_schedule(run: RunConfig) -> list[str]:
    """For --check-only: the comparison a resume would make, against run_dir's newest checkpoint; the
    changes it would accept (and record)."""
    from megamobi.training.data_provenance import newest_checkpoint_manifest

    newest = newest_checkpoint_manifest(run.run_dir) if run.checkpoint.resume else None
    if newest is None:
        return []
    changes, why = schedule_changes(newest[1], run)
    refuse_or_accept(changes, why, run=run, checkpoint=newest[0])
    return changes


class ScheduleRecord:
    """The schedule changes behind the next checkpoint: those recorded by the resumed one, and this start's."""

    def __init__(self, run: RunConfig, *, resume_from: Path | None) -> None:
        from megamobi.checkpointing.manifest import read_manifest

        self.prior: list[dict] = []
        self.changes: list[str] = []
        self.allowed = False
        self.step = 0
        if resume_from is not None:
            manifest = read_manifest(resume_from)
            self.prior = list(manifest.get("schedule_changes") or [])
            self.step = manifest.get("step", 0)
            self.changes, why = schedule_changes(manifest, run)
            refuse_or_accept(self.changes, why, run=run, checkpoint=Path(resume_from))
            self.allowed = why is not None
        if self.changes:
            self.prior.append({"step": self.step, "changes": self.changes, "allowed_by": ALLOW_KEY if self.allowed else None})

    def manifest_info(self) -> dict[str, Any]:
        return {"schedule_changes": self.prior} if self.prior else {}

    def log_changes(self, logger) -> None:
        if not self.changes:
            return
        how = f"{ALLOW_KEY} is true: " if self.allowed else "the decay has not begun: "
        logger.info(f"{how}continuing at step {self.step} with a changed lr schedule: " + "; ".join(self.changes))
        logger.log({"step": self.step, "schedule_change": self.changes, "schedule_allow_change": self.allowed}, echo=False)
