"""Where checkpoints go: can files be written there, is there room for the next one, and what a
failed write means in words.

Before the first step (and in `pretrain --check-only`) run_dir and run_dir/checkpoints/ must take a
new file (one is created and removed: `os.access` says yes to root on a read-only mount) and the
file system must have room for one more checkpoint: the newest checkpoint's size when there is one,
else an estimate from the model and the layout. A save that fails for space or permission says so
with the path and the free space (`describe_write_error`).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
from pathlib import Path

from megamobi.checkpointing.manifest import CHECKPOINTS, complete_checkpoints, read_manifest
from megamobi.config_io import ConfigError
from megamobi.model import parameter_counts

SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT)
PERMISSION_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)
RNG_FILE_BYTES = 64 << 10  # rng/rankNNNNN.json: about 48 KiB whatever the model (Python's and NumPy's state)
SMALL_FILES_BYTES = 256 << 10  # manifest, trainer state, DeepSpeed's small files
MARGIN = 1.1  # replicated norms (tensor parallel), padding, pickling


class StorageError(ConfigError):
    """run_dir or its checkpoints/ cannot take the next checkpoint (caught before any step: exit 2)."""


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int | None:
    """Free space (for this user) on the file system holding `path` or its nearest existing parent."""
    path = _existing(Path(path))
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def bytes_per_parameter(*, precision: str, zero_stage: int) -> int:
    """Bytes one parameter costs in a checkpoint (measured on the test model, tests/training/
    test_fault_storage.py): DeepSpeed's files hold the weights in the training precision (fp32 4,
    bf16 2) and the optimizer's fp32 master copy + Adam's two moments (12; ZeRO-0 fp32 keeps the
    weights themselves as the master copy: 8 more instead of 4 + 12), and the portable files hold
    fp32 weights (4) and moments (8) again."""
    portable = 4 + 8
    if zero_stage == 0 and precision == "fp32":
        return 4 + 8 + portable
    return (2 if precision == "bf16" else 4) + 12 + portable


def estimated_checkpoint_bytes(run, *, world_size: int) -> int:
    counts = parameter_counts(run.model_config)
    per_param = bytes_per_parameter(precision=run.precision, zero_stage=run.parallel.zero_stage)
    # A shared FFN lives once in every pipeline stage's DeepSpeed files (the portable files hold it once):
    # MobiLlama's shared FFN is a large share of its parameters, more than the margin covers.
    replicas = counts["params_mlp_unique"] * (run.parallel.pipeline - 1) if run.model_config.ffn_sharing == "shared" else 0
    total = counts["params_unique"] * per_param + replicas * (per_param - 12)
    return int(total * MARGIN) + world_size * RNG_FILE_BYTES + SMALL_FILES_BYTES


def last_checkpoint_bytes(run_dir: str | Path) -> tuple[int, Path] | None:
    """The size of the newest checkpoint (its manifest's byte counts), if it has a readable one."""
    for checkpoint in reversed(complete_checkpoints(run_dir)):
        try:
            files = read_manifest(checkpoint).get("files") or {}
            return sum(int(entry["bytes"]) for entry in files.values()), checkpoint
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def needed_bytes(run, *, world_size: int) -> tuple[int, str]:
    """(bytes the next checkpoint needs, where that number comes from)."""
    last = last_checkpoint_bytes(run.run_dir)
    if last is not None:
        return last[0], f"the size of {last[1].name}"
    params = parameter_counts(run.model_config)["params_unique"]
    return (estimated_checkpoint_bytes(run, world_size=world_size),
            f"estimated: {params:,} parameters, {run.precision}, ZeRO-{run.parallel.zero_stage}, {world_size} rank(s)")


def _try_create_file(directory: Path) -> OSError | None:
    """Create and remove a file in `directory`: the only test root cannot pass on a read-only mount."""
    try:
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".megamobi-write-test-{socket.gethostname()}-{os.getpid()}-")
    except OSError as err:
        return err
    os.close(fd)
    try:
        os.unlink(name)
    except OSError as err:
        return err
    return None


def _refusal(path: Path, err: OSError) -> str:
    if err.errno in SPACE_ERRORS:
        what = "is full (no space left to create a file)"
    elif err.errno == errno.EROFS:
        what = "is read-only (permission denied: read-only file system)"
    elif err.errno in PERMISSION_ERRORS:
        what = "is not writable (permission denied)"
    else:
        what = f"cannot take a new file ({err.strerror or err})"
    free = free_bytes(path)
    free_text = f"; {human_bytes(free)} free there" if free is not None else ""
    return (f"storage: {path} {what}{free_text}. Checkpoints could not be saved: make it writable, or choose "
            "another run_dir")


def check_storage(run, *, world_size: int) -> None:
    """run_dir and run_dir/checkpoints/ take a new file, and there is room for one more checkpoint.
    Creates nothing that stays (a run_dir that does not exist yet is tested at its nearest parent)."""
    run_dir = Path(run.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise StorageError(f"storage: run_dir {run_dir} is a file, not a folder: give the run a folder (a new one, "
                           "or the run's own) as run_dir")
    checkpoints = run_dir / CHECKPOINTS
    if checkpoints.exists() and not checkpoints.is_dir():
        raise StorageError(f"storage: {checkpoints} is a file; move it away (checkpoints are saved in that folder)")
    for directory in dict.fromkeys([_existing(run_dir), _existing(checkpoints)]):
        err = _try_create_file(directory)
        if err is not None:
            raise StorageError(_refusal(directory, err))
    needed, source = needed_bytes(run, world_size=world_size)
    where = _existing(checkpoints)
    free = free_bytes(where)
    if free is not None and free < needed:
        raise StorageError(
            f"storage: {where} has {human_bytes(free)} free, but one more checkpoint needs about "
            f"{human_bytes(needed)} ({source}): free space there (checkpoint.keep_last prunes old checkpoints "
            "only after a new one is saved), or choose a run_dir on a larger file system")


def describe_write_error(err: BaseException, *, directory: Path) -> str | None:
    """A failed checkpoint write in words ("disk full: ..." / "permission denied: ..."), with the path
    and the free space; None for an error that is not about space or permission."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:  # the OSError may be wrapped (torch.save, a thread)
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in SPACE_ERRORS + PERMISSION_ERRORS:
            break
        err = err.__cause__ or err.__context__
    if not isinstance(err, OSError) or err.errno not in SPACE_ERRORS + PERMISSION_ERRORS:
        return None
    path = err.filename or directory
    free = free_bytes(Path(directory))
    free_text = f"{human_bytes(free)} free on its file system" if free is not None else "free space unknown"
    if err.errno in SPACE_ERRORS:
        return f"disk full writing {path} ({free_text})"
    what = "permission denied (read-only file system)" if err.errno == errno.EROFS else "permission denied"
    return f"{what} writing {path} ({free_text})"
