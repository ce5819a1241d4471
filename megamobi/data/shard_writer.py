"""Shards written atomically by the process that produced their tokens.

A worker cuts its chunk's token stream into SEQ_LEN windows and writes them to `.bin.tmp` files of
at most samples_per_shard samples each, hashing the bytes as they are written (never read back),
plus the `.idx.tmp` index. The main process then writes the small per-sample source file (source
ids are global, numbered in input order, which only it knows) and renames the three files, `.bin`
last. A shard therefore exists under its final name only when complete, and no token passes
through the main process.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .indexed_format import SEQ_LEN, TOKEN_DTYPE, write_idx
from .manifest import shard_paths

SOURCE_ID_DTYPE = np.uint16
_BLOCK_SAMPLES = 512  # windows buffered before one write + hash update (2 MiB)


def chunk_shard_name(chunk: int, piece: int) -> str:
    return f"shard_{chunk:06d}_{piece:03d}"


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


@dataclass
class WrittenShard:
    """A shard whose .bin.tmp and .idx.tmp are written and fsynced; its sources still to write."""

    name: str
    num_samples: int
    bin_bytes: int
    bin_sha256: str
    max_token_id: int
    sample_sources: np.ndarray  # per sample: index into the writer's own source names


class WindowWriter:
    """Token arrays in, SEQ_LEN windows out into shards `name(0)`, `name(1)`, ...; a window's source
    is the source of its first token. What is left over (< SEQ_LEN tokens) is the tail."""

    def __init__(self, *, directory: Path, samples_per_shard: int, name) -> None:
        self._dir, self._per_shard, self._name = directory, samples_per_shard, name
        self._buffer = np.empty((_BLOCK_SAMPLES, SEQ_LEN), dtype=TOKEN_DTYPE)
        self._flat = self._buffer.reshape(-1)
        self._fill = 0  # tokens in the buffer
        self._row_sources: list[int] = []  # source of each started window in the buffer
        self._window_runs: list[list[int]] = []  # [source, tokens] runs of the last window
        self._source_ids: dict[str, int] = {}
        self.source_names: list[str] = []
        self.shards: list[WrittenShard] = []
        self._stream = None

    def _source(self, name: str) -> int:
        try:
            return self._source_ids[name]
        except KeyError:
            self._source_ids[name] = len(self.source_names)
            self.source_names.append(name)
            return self._source_ids[name]

    def add(self, tokens: np.ndarray, source: str) -> None:
        source_id, done, count = self._source(source), 0, len(tokens)
        if count == SEQ_LEN and self._fill % SEQ_LEN == 0:  # one whole window (every Amber line)
            self._row_sources.append(source_id)
            self._window_runs = [[source_id, SEQ_LEN]]
            self._flat[self._fill:self._fill + SEQ_LEN] = tokens
            self._fill += SEQ_LEN
            if self._fill == self._flat.size:
                self._write_rows(_BLOCK_SAMPLES)
            return
        while done < count:
            take = min(count - done, SEQ_LEN - self._fill % SEQ_LEN)
            if self._fill % SEQ_LEN == 0:  # a new window: its source is this token's
                self._row_sources.append(source_id)
                self._window_runs = [[source_id, take]]
            elif self._window_runs[-1][0] == source_id:
                self._window_runs[-1][1] += take
            else:
                self._window_runs.append([source_id, take])
            self._flat[self._fill:self._fill + take] = tokens[done:done + take]
            self._fill += take
            done += take
            if self._fill == self._flat.size:
                self._write_rows(_BLOCK_SAMPLES)

    def _write_rows(self, rows: int) -> None:
        """Write the buffer's first `rows` complete windows, starting new shards as they fill."""
        written = 0
        while written < rows:
            if self._stream is None:
                self._open()
            take = min(rows - written, self._per_shard - self._count)
            block = self._buffer[written:written + take]
            data = memoryview(block).cast("B")
            self._stream.write(data)
            self._hash.update(data)
            self._max = max(self._max, int(block.max()))
            self._sources.extend(self._row_sources[written:written + take])
            self._count += take
            written += take
            if self._count == self._per_shard:
                self._close()
        rest = self._fill - rows * SEQ_LEN
        self._flat[:rest] = self._flat[rows * SEQ_LEN:self._fill]
        self._fill = rest
        self._row_sources = self._row_sources[rows:]

    def _open(self) -> None:
        paths = shard_paths(self._dir, self._name(len(self.shards)))
        self._stream = open(tmp_path(paths["bin"]), "wb")
        self._hash, self._count, self._max, self._sources = hashlib.sha256(), 0, -1, []

    def _close(self) -> None:
        name = self._name(len(self.shards))
        paths = shard_paths(self._dir, name)
        self._stream.flush()
        os.fsync(self._stream.fileno())
        size = self._stream.tell()
        self._stream.close()
        self._stream = None
        with open(tmp_path(paths["idx"]), "wb") as stream:
            write_idx(stream, self._count)
            stream.flush()
            os.fsync(stream.fileno())
        self.shards.append(WrittenShard(name=name, num_samples=self._count, bin_bytes=size,
                                        bin_sha256=self._hash.hexdigest(), max_token_id=self._max,
                                        sample_sources=np.array(self._sources, dtype=SOURCE_ID_DTYPE)))

    def finish(self) -> tuple[np.ndarray, list[tuple[str, int]]]:
        """Write every complete window; returns the tail (tokens, run-length (source, count))."""
        full = self._fill // SEQ_LEN
        if full:
            self._write_rows(full)
        if self._stream is not None:
            self._close()
        tail = self._flat[:self._fill].copy()
        return tail, [(self.source_names[i], n) for i, n in self._window_runs] if len(tail) else []

    def abort(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def publish_shard(directory: Path, shard: WrittenShard, *, global_sources: np.ndarray,
                  source_names: list[str]) -> dict:
    """Main process: write the shard's source ids (global numbering), rename its files into place,
    and return its manifest record. `global_sources[local id]` is the global id."""
    paths = shard_paths(directory, shard.name)
    src = global_sources[shard.sample_sources].astype(SOURCE_ID_DTYPE)
    with open(tmp_path(paths["src"]), "wb") as stream:
        np.save(stream, src)
        stream.flush()
        os.fsync(stream.fileno())
        src_bytes = stream.tell()
    src_sha = hashlib.sha256(tmp_path(paths["src"]).read_bytes()).hexdigest()
    for key in ("idx", "src", "bin"):  # .bin last: under its final name, the others are final too
        os.replace(tmp_path(paths[key]), paths[key])
    counts = np.bincount(src, minlength=len(source_names)) if len(src) else np.zeros(0)
    return {
        "name": shard.name,
        "num_samples": shard.num_samples,
        "max_token_id": shard.max_token_id,
        "source_tokens": {source_names[i]: int(c) * SEQ_LEN for i, c in enumerate(counts) if c},
        "files": {
            "bin": {"file": paths["bin"].name, "bytes": shard.bin_bytes, "sha256": shard.bin_sha256},
            "idx": {"file": paths["idx"].name, "bytes": paths["idx"].stat().st_size,
                    "sha256": hashlib.sha256(paths["idx"].read_bytes()).hexdigest()},
            "src": {"file": paths["src"].name, "bytes": src_bytes, "sha256": src_sha},
        },
    }
