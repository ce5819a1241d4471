"""Publishing a checkpoint once every rank has written (and hashed) its files.

Each rank ends its part of a save by writing `.done/rank{R}.json` into the partial directory: the
digests of the files it wrote, or the error that stopped it. Rank 0 waits for all of them (files,
not collectives, so a save running in a background thread never talks to the process groups the
training step uses), then writes the manifest, fsyncs every folder, renames the directory into
place and moves `latest` (a new file, fsynced, renamed, folder fsynced). A save with any error is
reported and never published.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from megamobi.checkpointing.hashed_files import fsync_tree
from megamobi.checkpointing.manifest import write_manifest
from megamobi.files import fsync_directory, write_json_atomic
from megamobi.model_config import ModelConfig

DONE_DIR = ".done"
LATEST = "latest"


class CheckpointNotSaved(RuntimeError):
    """A rank could not write its part of a checkpoint; the checkpoint was not published."""


def report_rank_done(partial: Path, *, rank: int, files: dict[str, Any] | None, error: str | None = None) -> None:
    write_json_atomic(Path(partial) / DONE_DIR / f"rank{rank:05d}.json", {"files": files, "error": error})


def gather_rank_digests(partial: Path, *, world_size: int, poll_s: float = 0.02) -> dict[str, Any]:
    """Rank 0: wait until every rank reported, then all digests; CheckpointNotSaved if any failed."""
    reports = [Path(partial) / DONE_DIR / f"rank{rank:05d}.json" for rank in range(world_size)]
    while not all(report.is_file() for report in reports):
        if os.statvfs(partial).f_flag & os.ST_RDONLY:  # a rank that could not report never will
            missing = [rank for rank, report in enumerate(reports) if not report.is_file()]
            raise CheckpointNotSaved(f"permission denied (read-only file system) writing {partial}: rank(s) "
                                     f"{', '.join(map(str, missing))} could not report")
        time.sleep(poll_s)
    digests: dict[str, Any] = {}
    errors = []
    for rank, report in enumerate(reports):
        entry = json.loads(report.read_text())
        if entry["error"]:
            errors.append(f"rank {rank}: {entry['error']}")
        else:
            digests.update(entry["files"])
    if errors:
        raise CheckpointNotSaved("; ".join(errors))
    return digests


def publish_checkpoint(partial: Path, final: Path, *, model_config: ModelConfig, info: dict[str, Any],
                       digests: dict[str, Any]) -> None:
    """Rank 0: manifest, fsync, rename into place, then `latest`."""
    shutil.rmtree(Path(partial) / DONE_DIR)
    write_manifest(partial, model_config=model_config, info=info, digests=digests)
    fsync_tree(partial)
    if final.exists():  # a re-run of the same step after a crash: replace it
        shutil.rmtree(final)
    partial.rename(final)
    fsync_directory(final.parent)
    point_latest(final)


def point_latest(checkpoint: Path) -> None:
    """`latest` names `checkpoint`: written to a new file, fsynced, renamed over, folder fsynced."""
    root = checkpoint.parent
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as stream:
        stream.write(checkpoint.name + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    tmp.replace(root / LATEST)
    fsync_directory(root)
