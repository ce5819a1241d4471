"""The one table blending needs: how many samples of each source every block of the corpus holds.

Blocks are the train/validation split's blocks (megamobi/data/subsets.py: at most 2**20 of them,
ceil(N / 2**20) samples each), so the table has at most 2**20 rows of one int32 per source (29 MiB
for Amber's 7 sources) whatever the corpus size: nothing per sample. Building it reads every shard's
.src.npy once (2 bytes per sample), so it is built once per shard set and cached next to the shards,
in `<first data directory>/.blend/source_blocks-<key>.npy`, keyed by the sha256 of every directory's
manifest.json, the block size and BLEND_INDEX_VERSION. The first process to get the lock builds it and
renames it into place (atomic); processes starting at the same time wait for the lock, then every rank,
replay and evaluate memory-map the same file. A read-only data directory gets no cache: the table is
then built in memory by each process (correct, only slower).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from megamobi.files import fsync_directory, sha256_file

from .manifest import MANIFEST_NAME

BLEND_INDEX_VERSION = 1
CACHE_DIR = ".blend"


def _build(shards, *, block_size: int) -> np.ndarray:
    """(blocks, sources) int32 counts, one shard's .src.npy at a time (bounded memory): per local source
    id, a sum of `ids == id` over each block's part of the shard (np.add.reduceat on uint16 compares)."""
    num_sources = max(len(shards.sources), 1)
    total = len(shards)
    counts = np.zeros((-(-total // block_size), num_sources), dtype=np.int32)
    for shard in range(len(shards.bin_paths)):
        first, last = int(shards._offsets[shard]), int(shards._offsets[shard + 1])
        if last == first:
            continue
        ids = np.load(shards._src_files[shard])
        first_block, last_block = first // block_size, (last - 1) // block_size
        starts = np.maximum(np.arange(first_block, last_block + 1, dtype=np.int64) * block_size - first, 0)
        for local, global_id in enumerate(shards._src_maps[shard].tolist()):
            counts[first_block:last_block + 1, global_id] += np.add.reduceat(ids == local, starts, dtype=np.int32)
    return counts


def cache_key(shards, *, block_size: int) -> str:
    inputs = {"version": BLEND_INDEX_VERSION, "block_size": block_size, "sources": shards.sources,
              "manifests": [sha256_file(Path(d) / MANIFEST_NAME) for d in shards.directory_starts]}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _cached(path: Path, shards, *, block_size: int) -> np.ndarray | None:
    """The cached table, memory-mapped, or None when it is missing or damaged."""
    try:
        table = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    shape = (-(-len(shards) // block_size), max(len(shards.sources), 1))
    if table.dtype == np.int32 and table.shape == shape and int(table.sum(dtype=np.int64)) == len(shards):
        return table
    return None


def block_source_counts(shards, *, block_size: int) -> np.ndarray:
    """The (blocks, sources) table of a ShardedDataset, memory-mapped from its cache (built first when
    missing or damaged), or built in memory when the first data directory is not writable."""
    folder = Path(next(iter(shards.directory_starts))) / CACHE_DIR
    path = folder / f"source_blocks-{cache_key(shards, block_size=block_size)}.npy"
    table = _cached(path, shards, block_size=block_size)
    if table is not None:
        return table
    try:
        folder.mkdir(exist_ok=True)
        lock = open(folder / "lock", "a")
    except OSError:
        return _build(shards, block_size=block_size)  # read-only shards: no cache
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait here, then map its file
        table = _cached(path, shards, block_size=block_size)  # built by another process while this one waited
        if table is not None:
            return table
        for stale in folder.glob("*.tmp"):  # a builder killed mid-write (only the lock holder writes)
            stale.unlink(missing_ok=True)
        table = _build(shards, block_size=block_size)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as stream:
                np.save(stream, table)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
            fsync_directory(folder)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk: use the table built in memory
            return table
    return np.load(path, mmap_mode="r")
