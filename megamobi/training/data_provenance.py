"""What data a run trained on, recorded in every checkpoint, and refused when a resume would change it.

Every checkpoint's megamobi.json gets `data_provenance`: the segments of training that led to it
(steps, consumed samples before them, batch sizes, data-parallel size, seq_len, the data stage, its
data config and the sha256 of each data directory's manifest.json), `data_fingerprints` (every
shard file's size and sampled blocks, megamobi/data/fingerprints.py), and `data_stage`: the stage of its
last step and that stage's progress. `python -m megamobi.replay` reads only that and the shards to say
which tokens each step and rank consumed (megamobi/data/replay.py).

On resume, the checkpoint's data is compared with the run's (megamobi/training/stage_checks.py): a
change to what a started stage trains on (its paths, their manifests, blend, split), to the seed or to
seq_len would silently change the data order that the provenance describes, so the run stops and
names `data.allow_change: true`, which continues and records what changed. Stages that have not
started may change, and stages may be appended, without it: accepted and recorded the same way (in
the next checkpoints' provenance and in metrics.jsonl).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megamobi.checkpointing.manifest import read_manifest
from megamobi.config_io import ConfigError
from megamobi.data.replay import (
    PROVENANCE_KEY,
    Segment,
    checkpoint_segments,
    merge_segments,
    read_checkpoint_manifests,
    truncate_segments,
)
from megamobi.data.stages import STAGE_ZERO, StageCursor, StagePosition, all_paths
from megamobi.training.run_config import RunConfig
from megamobi.training.stage_checks import content_check_note, manifest_checksums, stage_changes

ALLOW_KEY = "data.allow_change"


def refuse_or_accept(refused: list[str], *, run: RunConfig, checkpoint: Path) -> None:
    if refused and not run.data.allow_change:
        raise ConfigError(
            f"resuming from {checkpoint} with other data than it was trained on would silently change the run's "
            f"data order and make its provenance false. Changed: {'; '.join(refused)}. Restore the original data "
            f"settings (or shard files), start a new run_dir, or set {ALLOW_KEY}: true to continue anyway (recorded in the next "
            "checkpoints and in metrics.jsonl)")


def newest_checkpoint_manifest(run_dir: str | Path) -> tuple[Path, dict] | None:
    found = read_checkpoint_manifests(run_dir)
    return found[-1] if found else None


def check_resume_data(run: RunConfig) -> list[str]:
    """For --check-only: the comparison a resume would make, against run_dir's newest checkpoint.
    Returns the changes that a resume would accept and record."""
    if not run.checkpoint.resume:
        return []
    newest = newest_checkpoint_manifest(run.run_dir)
    if newest is None:
        return []
    accepted, refused = stage_changes(newest[1], run)
    refuse_or_accept(refused, run=run, checkpoint=newest[0])
    return refused + accepted


def resume_content_note(run: RunConfig) -> str | None:
    """For --check-only: the line a resume would print when run_dir's newest checkpoint has no shard
    fingerprints (its shards' content cannot be compared)."""
    newest = newest_checkpoint_manifest(run.run_dir) if run.checkpoint.resume else None
    return None if newest is None else content_check_note(newest[1], checkpoint=newest[0])


class DataProvenance:
    """The segments behind the next checkpoint: those of the resumed checkpoint, then this run's own,
    one per data stage (and layout); and which stage each step trains on."""

    def __init__(self, run: RunConfig, *, resume_from: Path | None, data_parallel_size: int) -> None:
        self.run = run
        self.data_parallel_size = data_parallel_size
        self.changes: list[str] = []
        self.allowed = False  # some change needed data.allow_change
        self.note: str | None = None  # the resumed checkpoint has no shard fingerprints to compare
        prior, step, resumed = [], 0, None
        if resume_from is not None:
            manifest = read_manifest(resume_from)
            accepted, refused = stage_changes(manifest, run)
            refuse_or_accept(refused, run=run, checkpoint=Path(resume_from))
            self.changes, self.allowed = refused + accepted, bool(refused)
            self.note = content_check_note(manifest, checkpoint=Path(resume_from))
            step = manifest.get("step", 0)
            prior = truncate_segments(checkpoint_segments(run.run_dir, manifest), last_step=step)
            resumed = manifest.get("data_stage") or STAGE_ZERO
        self.prior = prior
        self.resumed_stage = resumed  # carried into a checkpoint saved before this start trains a step
        self.own: list[Segment] = []
        self.resumed_step = step
        self.cursor = StageCursor(run.data_stages, resumed=resumed)
        self.current: StagePosition | None = None
        self._checksums = manifest_checksums(all_paths(run.data_stages))

    def record_skip(self, step: int) -> None:
        """Step `step` consumed its samples without training on them (its update was refused)."""
        if self.own:
            self.own[-1] = dataclasses.replace(self.own[-1], skipped_steps=sorted({*self.own[-1].skipped_steps, step}))

    def next_step(self, *, step: int, consumed_samples: int, consumed_tokens: int) -> StagePosition:
        """The stage and position of step `step` (1-based), about to train; a stage's first step opens a segment."""
        self.current = where = self.cursor.step(step=step, consumed_samples=consumed_samples,
                                                consumed_tokens=consumed_tokens)
        if where.begins or not self.own:
            if self.own:
                self.own[-1] = dataclasses.replace(self.own[-1], last_step=step - 1)
            b, stage = self.run.batch, where.stage
            self.own.append(Segment(
                first_step=step, last_step=step - 1, consumed_samples_before=consumed_samples,
                global_batch_size=b.global_batch_size, micro_batch_size=b.micro_batch_size,
                data_parallel_size=self.data_parallel_size, seq_len=b.seq_len, data=stage.data_record(),
                data_manifests={p: self._checksums[p] for p in stage.paths},
                data_changed=[] if self.own else list(self.changes),
                stage=stage.index, stage_name=stage.name, stage_start_samples=where.start_samples))
        return where

    def manifest_info(self, *, step: int, consumed_tokens: int, end_tokens: int) -> dict[str, Any]:
        """The `data_provenance` and `data_stage` entries of a checkpoint saved after `step`; `end_tokens`
        is where the run ends (the last stage's planned end)."""
        own = self.own[:-1] + [dataclasses.replace(self.own[-1], last_step=step, skipped_steps=[
            k for k in self.own[-1].skipped_steps if k <= step])] if self.own else []
        segments = merge_segments([s for s in [*self.prior, *own] if s.last_step >= s.first_step])
        info: dict[str, Any] = {PROVENANCE_KEY: [s.to_record() for s in segments]}
        if self.current is not None:
            until = self.current.stage.until_tokens
            tps = self.run.tokens_per_step
            start = self.current.start_tokens
            stage_end = end_tokens if until is None else min(end_tokens, start + -(-(until - start) // tps) * tps)
            info["data_stage"] = self.current.record(consumed_tokens=consumed_tokens, end_tokens=stage_end)
        elif self.resumed_stage is not None:
            info["data_stage"] = self.resumed_stage
        return info

    def log_changes(self, logger) -> None:
        """One line and one metrics.jsonl record when the resumed data changed (stages appended or changed
        before they started, or anything with data.allow_change); one line when the shards' content could
        not be compared (a checkpoint without fingerprints)."""
        if self.note:
            logger.info(self.note)
        if not self.changes:
            return
        how = f"{ALLOW_KEY} is true" if self.allowed else "only stages not yet started or still running changed"
        logger.info(f"{how}: continuing at step {self.resumed_step} with changed data: " + "; ".join(self.changes))
        logger.log({"step": self.resumed_step, "data_change": self.changes, "data_allow_change": self.allowed}, echo=False)

    def announce(self, where: StagePosition, *, logger, windows: int) -> None:
        """One line, and a metrics.jsonl record (which the plots mark), when a data stage begins; the same
        when a stage's order runs out (`windows` training windows) and its next epoch, a new shuffle, begins."""
        stage, gb = where.stage, self.run.batch.global_batch_size
        if where.begins and stage.staged:
            logger.info(f"step {where.step}: {stage.label()} begins after {where.start_tokens:,} tokens "
                        f"({', '.join(stage.paths)})")
            logger.log({"step": where.step, "consumed_tokens": where.start_tokens, "data_stage_begins": stage.number,
                        "data_stage_name": stage.name}, echo=False)
        first_new, last = max(1, -(-where.position // windows)), (where.position + gb - 1) // windows
        if first_new <= last:  # an epoch boundary falls inside this step's global batch
            what = stage.label() if stage.staged else "the training data"
            times = "once" if last == 1 else f"{last} times"
            logger.info(f"step {where.step}: {what}: epoch {last + 1} begins, each of its {windows:,} training "
                        f"windows used {times}; a new order")
            logger.log({"step": where.step, "data_epoch": last + 1, "data_stage": stage.number}, echo=False)
