"""File helpers every artefact writer shares: checksums and atomic JSON writes."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any


def sha256_file(path: Path, *, block_bytes: int = 8 << 20, direct: bool = False) -> str:
    """`direct`: read with O_DIRECT where the file system allows it (as `dd iflag=direct`): the
    bytes come from the disk, not the page cache, which they do not fill (checkpoint verification)."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # tmpfs and some others refuse O_DIRECT
            pass
        else:
            return _sha256_fd(fd, block_bytes)
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def _sha256_fd(fd: int, block_bytes: int) -> str:
    """Hash an O_DIRECT file through a page-aligned buffer (anonymous mmap)."""
    digest = hashlib.sha256()
    with mmap.mmap(-1, block_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as buffer:
        view = memoryview(buffer)
        try:
            while count := os.readv(fd, [view]):
                digest.update(view[:count])
        finally:
            view.release()
            os.close(fd)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, fsync, rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as stream:
        json.dump(data, stream, indent=1)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def fsync_directory(directory: Path) -> None:
    """Make the creations, renames and removals of names in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any:
    with open(path) as stream:
        return json.load(stream)
