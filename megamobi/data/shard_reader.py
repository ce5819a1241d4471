"""Reading shard samples so that a shard cut short while the run reads it is named, never a SIGBUS.

A memory map of a `.bin` that another process truncates (a re-run of the preprocessor into the same
folder, a sync tool, a quota) makes every later access past the new end a SIGBUS: the rank dies
(exit status 135) inside NumPy with no word of which file. So samples are read with `pread` from
a file descriptor opened on first use: a short read is a ShardError naming the file, its size now
and the size its index needs. `shards_shorter_than_index` checks every shard of some directories
against its `.idx` (the run does, at each checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megamobi.files import read_json

from .errors import ShardError
from .indexed_format import SAMPLE_BYTES, SEQ_LEN, TOKEN_DTYPE, read_idx_header
from .manifest import MANIFEST_NAME

_FIX = ("it was changed while the run was reading it: restore it (re-run the preprocessor with the same "
        "arguments into a new folder), then run the same command to resume from the newest checkpoint")


def shorter_than_index_line(path: Path, *, size: int, num_samples: int) -> str:
    return (f"shard {path} is now {size} bytes, shorter than its index ({num_samples} samples x {SAMPLE_BYTES} "
            f"bytes = {num_samples * SAMPLE_BYTES} bytes): {_FIX}")


class ShardBin:
    """One shard's `.bin`: len() samples, [row] -> read-only uint16 array of SEQ_LEN tokens."""

    def __init__(self, path: Path, *, num_samples: int) -> None:
        self.path = Path(path)
        self.num_samples = num_samples
        self._fd: int | None = None  # opened on first read: shards never read hold no descriptor

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, row: int) -> np.ndarray:
        return np.frombuffer(self._read(int(row)), dtype=TOKEN_DTYPE, count=SEQ_LEN)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), SEQ_LEN) tokens of several rows (replay's vectorised reads): one pread each."""
        return np.frombuffer(b"".join(self._read(int(row)) for row in rows), dtype=TOKEN_DTYPE).reshape(-1, SEQ_LEN)

    def _read(self, row: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, SAMPLE_BYTES, row * SAMPLE_BYTES)
        if len(data) < SAMPLE_BYTES:
            raise ShardError(shorter_than_index_line(self.path, size=os.fstat(self._fd).st_size,
                                                     num_samples=self.num_samples))
        return data

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


def shards_shorter_than_index(directories: list[str | Path]) -> list[str]:
    """One line per shard whose `.bin` is now shorter than its `.idx` says (or whose files are gone)."""
    problems = []
    for directory in map(Path, directories):
        try:
            records = read_json(directory / MANIFEST_NAME)["shards"]
        except (OSError, ValueError, KeyError) as err:
            problems.append(f"{directory / MANIFEST_NAME}: cannot be read now ({err})")
            continue
        for record in records:
            files = record["files"]
            bin_path, idx_path = directory / files["bin"]["file"], directory / files["idx"]["file"]
            try:
                num_samples = read_idx_header(idx_path).sequence_count
                size = bin_path.stat().st_size
            except (OSError, ValueError) as err:
                problems.append(f"shard {bin_path}: {err}: {_FIX}")
                continue
            if size < num_samples * SAMPLE_BYTES:
                problems.append(shorter_than_index_line(bin_path, size=size, num_samples=num_samples))
    return problems
