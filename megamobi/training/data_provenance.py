"""What data a run trained on, recorded in every checkpoint, and refused when a resume would change it.

Every checkpoint's megamobi.json gets `data_provenance`: the segments of training that led to it
(steps, consumed samples before them, batch sizes, data-parallel size, seq_len, data config and the
sha256 of each data directory's manifest.json). `python -m megamobi.replay` reads only that and the
shards to say which tokens each step and rank consumed (megamobi/data/replay.py).

On resume, the checkpoint's data (manifest checksums, blend, val_fraction, seed) and seq_len are
compared with the run's: any difference would silently change the data order that the provenance
describes, so the run stops and names `data.allow_change: true`, which continues and records what
changed (in the next checkpoints' provenance and in metrics.jsonl).
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
from megamobi.files import sha256_file
from megamobi.training.run_config import RunConfig

ALLOW_KEY = "data.allow_change"


def manifest_checksums(paths: list[str]) -> dict[str, str]:
    """sha256 of each data directory's manifest.json (what checkpoints record as data_manifests)."""
    return {path: sha256_file(Path(path) / "manifest.json") for path in paths}


def _short(sha: str | None) -> str:
    return "none" if sha is None else sha[:12]


def data_changes(manifest: dict[str, Any], run: RunConfig) -> list[str]:
    """What differs between the data a checkpoint was trained on and the run's; empty when nothing."""
    saved = manifest.get("run_config") or {}
    saved_data, saved_batch = saved.get("data") or {}, saved.get("batch") or {}
    recorded = manifest.get("data_manifests")
    if not saved_data or recorded is None:
        return []  # a weights-only checkpoint (e.g. from `convert from-hf`): no data to compare with
    changes = []
    current = manifest_checksums(run.data.paths)
    saved_paths = list(saved_data.get("paths", []))
    if [recorded.get(p) for p in saved_paths] != list(current.values()):
        if saved_paths != list(run.data.paths):
            changes.append(f"data.paths: {saved_paths} -> {list(run.data.paths)}")
        else:
            for path in saved_paths:
                if recorded.get(path) != current[path]:
                    changes.append(f"{path}/manifest.json: sha256 {_short(recorded.get(path))} -> {_short(current[path])} "
                                   "(the shards were rebuilt or replaced)")
    for key, now in (("source_weights", run.data.source_weights), ("val_fraction", run.data.val_fraction),
                     ("seed", run.data.seed)):
        before = saved_data.get(key)
        if before != now:
            changes.append(f"data.{key}: {before} -> {now}")
    if saved_batch.get("seq_len") != run.batch.seq_len:
        changes.append(f"batch.seq_len: {saved_batch.get('seq_len')} -> {run.batch.seq_len}")
    return changes


def refuse_or_accept(changes: list[str], *, run: RunConfig, checkpoint: Path) -> None:
    if changes and not run.data.allow_change:
        raise ConfigError(
            f"resuming from {checkpoint} with other data than it was trained on would silently change the run's "
            f"data order and make its provenance false. Changed: {'; '.join(changes)}. Restore the original data "
            f"settings, start a new run_dir, or set {ALLOW_KEY}: true to continue anyway (recorded in the next "
            "checkpoints and in metrics.jsonl)")


def newest_checkpoint_manifest(run_dir: str | Path) -> tuple[Path, dict] | None:
    found = read_checkpoint_manifests(run_dir)
    return found[-1] if found else None


def check_resume_data(run: RunConfig) -> None:
    """For --check-only: the comparison a resume would make, against run_dir's newest checkpoint."""
    if not run.checkpoint.resume:
        return
    newest = newest_checkpoint_manifest(run.run_dir)
    if newest is not None:
        refuse_or_accept(data_changes(newest[1], run), run=run, checkpoint=newest[0])


class DataProvenance:
    """The segments behind the next checkpoint: those of the resumed checkpoint, then this run's own."""

    def __init__(self, run: RunConfig, *, resume_from: Path | None, data_parallel_size: int) -> None:
        self.changes: list[str] = []
        prior, step, consumed = [], 0, 0
        if resume_from is not None:
            manifest = read_manifest(resume_from)
            self.changes = data_changes(manifest, run)
            refuse_or_accept(self.changes, run=run, checkpoint=Path(resume_from))
            step, consumed = manifest.get("step", 0), manifest.get("consumed_samples", 0)
            prior = truncate_segments(checkpoint_segments(run.run_dir, manifest), last_step=step)
        b = run.batch
        self.prior = prior
        self.current = Segment(
            first_step=step + 1, last_step=step, consumed_samples_before=consumed, global_batch_size=b.global_batch_size,
            micro_batch_size=b.micro_batch_size, data_parallel_size=data_parallel_size, seq_len=b.seq_len,
            data={"paths": list(run.data.paths), "source_weights": run.data.source_weights,
                  "val_fraction": run.data.val_fraction, "seed": run.data.seed},
            data_manifests=manifest_checksums(run.data.paths), data_changed=list(self.changes))
        self.resumed_step = step

    def record_skip(self, step: int) -> None:
        """Step `step` consumed its samples without training on them (its update was refused)."""
        self.current = dataclasses.replace(self.current, skipped_steps=sorted({*self.current.skipped_steps, step}))

    def manifest_info(self, *, step: int) -> dict[str, Any]:
        """The `data_provenance` entry of a checkpoint saved after `step`."""
        current = dataclasses.replace(self.current, last_step=step,
                                      skipped_steps=[k for k in self.current.skipped_steps if k <= step])
        segments = [*self.prior, current]
        return {PROVENANCE_KEY: [s.to_record() for s in merge_segments([s for s in segments if s.last_step >= s.first_step])]}

    def log_changes(self, logger) -> None:
        """One warning line and one metrics.jsonl record when data.allow_change let changed data through."""
        if not self.changes:
            return
        logger.info(f"{ALLOW_KEY} is true: continuing at step {self.resumed_step} with changed data: " + "; ".join(self.changes))
        logger.log({"step": self.resumed_step, "data_change": self.changes, "data_allow_change": True}, echo=False)
