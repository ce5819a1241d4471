"""Writes fixed-size shards atomically: everything goes to *.tmp names, is fsynced, then renamed.
A shard therefore exists under its final name only when complete; the caller records it in the
resume state only after the rename."""
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megamobi.files import sha256_file

from .indexed_format import SEQ_LEN, TOKEN_DTYPE, write_idx
from .manifest import shard_paths

SOURCE_ID_DTYPE = np.uint16
Position = tuple[int, int]  # (chunk index, token offset in that chunk's token stream)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


class ShardWriter:
    def __init__(self, *, directory: Path, samples_per_shard: int, first_index: int,
                 source_names: list[str], on_shard_done: Callable[[dict], None]) -> None:
        self._dir = directory
        self._per_shard = samples_per_shard
        self._index = first_index
        self._source_names = source_names  # shared with the caller, grows as sources appear
        self._on_done = on_shard_done
        self._stream = None
        self._hash = None
        self._src_parts: list[np.ndarray] = []
        self._count = 0
        self._start: Position | None = None

    def _open(self, start: Position) -> None:
        paths = shard_paths(self._dir, shard_name(self._index))
        self._stream = open(_tmp(paths["bin"]), "wb")
        self._hash = hashlib.sha256()
        self._src_parts, self._count, self._start = [], 0, start
        self._max_token_id = -1

    def add(self, samples: np.ndarray, sources: np.ndarray, *, chunk: int, offset: int,
            end: Position) -> None:
        """samples: [n, SEQ_LEN] uint16, consecutive in chunk `chunk` from token `offset` on;
        `end` is the stream position right after the last sample (it may lie in a later chunk
        when a single sample spans chunks)."""
        done = 0
        while done < len(samples):
            if self._stream is None:
                self._open((chunk, offset + done * SEQ_LEN))
            take = min(self._per_shard - self._count, len(samples) - done)
            block = np.ascontiguousarray(samples[done:done + take], dtype=TOKEN_DTYPE)
            data = block.tobytes()
            if take:  # the manifest records the largest id, so a run can refuse data its model cannot embed
                self._max_token_id = max(self._max_token_id, int(block.max()))
            self._stream.write(data)
            self._hash.update(data)
            self._src_parts.append(np.asarray(sources[done:done + take], dtype=SOURCE_ID_DTYPE))
            self._count += take
            done += take
            if self._count == self._per_shard:
                self._close(end=end if done == len(samples) else (chunk, offset + done * SEQ_LEN))

    def finish(self, *, end: Position) -> None:
        if self._stream is not None and self._count:
            self._close(end=end)

    def abort(self) -> None:
        """Drop the shard in progress (error or interrupt): only *.tmp files exist for it."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        for path in shard_paths(self._dir, shard_name(self._index)).values():
            _tmp(path).unlink(missing_ok=True)

    def _close(self, *, end: Position) -> None:
        name = shard_name(self._index)
        paths = shard_paths(self._dir, name)
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        self._stream = None
        src = np.concatenate(self._src_parts)
        with open(_tmp(paths["idx"]), "wb") as stream:
            write_idx(stream, self._count)
            stream.flush()
            os.fsync(stream.fileno())
        with open(_tmp(paths["src"]), "wb") as stream:
            np.save(stream, src)
            stream.flush()
            os.fsync(stream.fileno())
        # .bin last: a .bin under its final name implies .idx and .src.npy are final too.
        for key in ("idx", "src", "bin"):
            os.replace(_tmp(paths[key]), paths[key])
        counts = np.bincount(src, minlength=len(self._source_names)) if len(src) else np.zeros(0)
        record = {
            "name": name,
            "num_samples": self._count,
            "max_token_id": self._max_token_id,
            "source_tokens": {self._source_names[i]: int(c) * SEQ_LEN for i, c in enumerate(counts) if c},
            "files": {
                "bin": {"file": paths["bin"].name, "bytes": paths["bin"].stat().st_size,
                        "sha256": self._hash.hexdigest()},
                "idx": {"file": paths["idx"].name, "bytes": paths["idx"].stat().st_size,
                        "sha256": sha256_file(paths["idx"])},
                "src": {"file": paths["src"].name, "bytes": paths["src"].stat().st_size,
                        "sha256": sha256_file(paths["src"])},
            },
            "start": list(self._start),
            "end": list(end),
        }
        self._index += 1
        self._on_done(record)
