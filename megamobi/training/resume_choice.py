"""Which checkpoint a run resumes from, and what a start does when run_dir has checkpoints but none can be used.

The newest checkpoint that is whole is resumed; damaged newer ones (a manifest that is missing or does
not parse, files missing, of another size, or failing their checksums) are skipped with one line
each and left where they are. A run_dir whose checkpoints are ALL unusable never starts over
silently (that emptied metrics.jsonl and deleted the damaged checkpoints as the new run passed their
steps): the start stops (exit 2) listing each checkpoint and why, before anything is written. Starting
over takes `checkpoint.restart_from_scratch: true`, and even then nothing is deleted: the checkpoints
and the logs a new run would overwrite or mix with its own are moved into RUN_DIR/discarded-<UTC time>/.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from megamobi.checkpointing.manifest import MANIFEST_NAME, manifest_damage, read_manifest, verify_checkpoint
from megamobi.config_io import ConfigError
from megamobi.files import fsync_directory
from megamobi.training.append_logs import APPENDED_LOGS, fix_appended_logs

CHECKPOINTS = "checkpoints"
# What a restart from scratch moves aside: the checkpoints, and the logs the new run would empty
# (metrics.jsonl) or mix with its own records of the same steps (events.jsonl, TensorBoard's files).
MOVED_ASIDE = (CHECKPOINTS, *APPENDED_LOGS, "tensorboard")
RESTART_KEY = "checkpoint.restart_from_scratch"


class NoUsableCheckpoint(ConfigError):
    """run_dir holds checkpoints and none can be resumed (exit 2)."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Every step_* directory of run_dir, oldest first, whole or not (a .step_*.partial is not one:
    it is a save that never finished, and a run that has only those starts from step 0 as before)."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def quick_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed, found without reading its payload (its manifest, and every
    file present at its recorded size), or None. The checksums are checked by verify_checkpoint()."""
    if not (checkpoint / MANIFEST_NAME).is_file():
        return f"no {MANIFEST_NAME} (deleted, or never written)"
    try:
        manifest = read_manifest(checkpoint)
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError
        return f"{MANIFEST_NAME} is damaged ({type(err).__name__}: {str(err)[:120]})"
    damage = manifest_damage(manifest)
    if damage:
        return f"{MANIFEST_NAME} is damaged ({damage})"
    problems = []
    for name, entry in manifest["files"].items():
        path = checkpoint / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    return "; ".join(problems[:3]) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "") or None


def _short(problems: list[str], checkpoint: Path) -> str:
    """verify_checkpoint()'s problems with the checkpoint's own path left out (the list names it)."""
    shown = [p.replace(f"{checkpoint}/", "") for p in problems[:3]]
    return "; ".join(shown) + (f" and {len(problems) - 3} more" if len(problems) > 3 else "")


def newest_usable(run_dir: str | Path, *, verify: bool = False) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that passes quick_problem(), and with `verify` its checksums too; the
    newer ones skipped, with why)."""
    skipped: list[tuple[Path, str]] = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = quick_problem(checkpoint)
        if problem is None and verify:
            problem = _short(verify_checkpoint(checkpoint), checkpoint) or None
        if problem is None:
            return checkpoint, skipped
        skipped.append((checkpoint, problem))
    return None, skipped


def no_usable_checkpoint(run_dir: str | Path, unusable: list[tuple[Path, str]]) -> NoUsableCheckpoint:
    listed = "\n".join(f"  {checkpoint.name}: {why}" for checkpoint, why in sorted(unusable))
    return NoUsableCheckpoint(
        f"{run_dir} holds {len(unusable)} checkpoint(s) and none can be resumed:\n{listed}\n"
        f"Nothing was changed or deleted. Restore a good copy of one of them (python -m megamobi.checkpoints "
        f"{run_dir} --verify checks them), or set {RESTART_KEY}: true to move them and the run's logs into "
        f"{Path(run_dir) / 'discarded-<time>'}/ and train from step 0, or use a new run_dir")


@dataclass
class ResumePlan:
    checkpoint: Path | None  # what the start will resume from
    lines: list[str]  # what it skips, or moves aside (--check-only prints them)
    restart: bool = False  # checkpoint.restart_from_scratch will move the checkpoints and logs aside


def resume_plan(run, *, verify: bool) -> ResumePlan:
    """Before any process group (every start, and --check-only with `verify`: checksums too). Raises
    NoUsableCheckpoint when run_dir's checkpoints are all unusable and a restart was not asked for."""
    if not run.checkpoint.resume:
        return ResumePlan(None, [])
    found, skipped = newest_usable(run.run_dir, verify=verify)
    lines = [f"on resume: skipping checkpoint {checkpoint}: {why}" for checkpoint, why in skipped]
    if found is not None:
        return ResumePlan(found, lines + ([f"on resume: falling back to {found}"] if skipped else []))
    if not skipped:
        return ResumePlan(None, [])  # a new run_dir (or one whose only save never finished)
    if not run.checkpoint.restart_from_scratch:
        raise no_usable_checkpoint(run.run_dir, skipped)
    return ResumePlan(None, [f"on start: none of the {len(skipped)} checkpoint(s) can be resumed; {RESTART_KEY}: they "
                             f"and the run's logs will be moved into {Path(run.run_dir) / 'discarded-<time>'}/ and "
                             "training starts from step 0"], restart=True)


def move_aside(run_dir: str | Path, *, report) -> Path:
    """Rank 0: rename the checkpoints and logs into run_dir/discarded-<UTC time>/ (same filesystem: no
    copy, nothing deleted), with one `report` line saying where."""
    run_dir = Path(run_dir)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target, n = run_dir / f"discarded-{stamp}", 1
    while target.exists():
        n += 1
        target = run_dir / f"discarded-{stamp}-{n}"
    target.mkdir()
    moved = []
    for name in MOVED_ASIDE:
        if (run_dir / name).exists():
            os.rename(run_dir / name, target / name)
            moved.append(name)
    fsync_directory(target)
    fsync_directory(run_dir)
    report(f"{RESTART_KEY}: moved {', '.join(moved)} into {target} (nothing was deleted); training starts from step 0")
    return target


def prepare_run_dir(run, *, report) -> Path | None:
    """Collective, in the Trainer before anything is written: the checkpoint to resume from (verified
    over the ranks; megamobi.training.checkpoint.find_resume_checkpoint) or None; the refusal or the
    restart when none can be used; the appended logs' torn last lines cut off (rank 0)."""
    import torch.distributed as dist  # here: the checks before any process group stay free of torch

    from megamobi.training.checkpoint import find_resume_checkpoint, from_rank0

    rank = dist.get_rank() if dist.is_initialized() else 0
    skipped: list = []
    found = find_resume_checkpoint(run.run_dir, report=report, skipped=skipped)
    # complete_checkpoints() leaves out step_* directories without a manifest: damaged all the same.
    unlisted = from_rank0([p for p in checkpoint_dirs(run.run_dir) if not (p / MANIFEST_NAME).is_file()]
                          if rank == 0 else None)
    unlisted = [p for p in unlisted if found is None or p.name > found.name]
    if rank == 0:
        for checkpoint in unlisted:
            report(f"skipping checkpoint {checkpoint}: {quick_problem(checkpoint)}")
    unusable = [(p, _short(problems, p)) for p, problems in skipped] + [(p, f"no {MANIFEST_NAME}") for p in unlisted]
    if found is None and unusable and not run.checkpoint.restart_from_scratch:
        raise no_usable_checkpoint(run.run_dir, unusable)  # the same decision on every rank
    error = None
    if rank == 0:  # the other ranks wait in from_rank0, so that none appends (events) before this is done
        try:
            if found is None and unusable:
                move_aside(run.run_dir, report=report)
            fix_appended_logs(run.run_dir, report=report)
        except ConfigError as err:  # a damaged line before the last one of a log
            error = str(err)
        except OSError as err:
            error = f"{run.run_dir}: could not prepare the run directory: {err}"
    error = from_rank0(error)
    if error:
        raise ConfigError(error)
    return found
