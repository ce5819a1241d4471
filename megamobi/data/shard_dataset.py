"""Memory-mapped read access to one or more shard directories."""
import os
from pathlib import Path

import numpy as np

from megamobi.files import read_json

from .errors import ShardError
from .indexed_format import SEQ_LEN
from .manifest import FORMAT_NAME, MANIFEST_NAME
from .shard_check import shard_problems
from .shard_reader import ShardBin

_FIX_HINT = "re-run data_tools/preprocess_amber.py with the same arguments to rebuild the damaged shards"


class ShardedDataset:
    """All samples of the given shard directories, in directory then shard order.

    Opening reads each manifest, stats every file and reads each .idx header (34 bytes):
    O(number of shards), no per-sample index is built. ds[i] is a read-only uint16 view
    of SEQ_LEN tokens read from its shard (a shard cut short since: a ShardError naming it)."""

    def __init__(self, paths: list[str | Path], *, verify_checksums: bool = False) -> None:
        if not paths:
            raise ShardError("no shard directories given")
        self.sources: list[str] = []
        self._bins: list[ShardBin] = []  # read with pread, not a memory map (megamobi.data.shard_reader)
        self._src_files: list[Path] = []
        self._src_maps: list[np.ndarray] = []  # local source id -> global id, per shard
        self._src_mmaps: dict[int, np.ndarray] = {}  # shard -> its .src.npy memory-mapped (sources_at)
        self._src_data_offsets: dict[int, int] = {}  # shard -> where its .src.npy array starts (sources_between)
        self.bin_paths: list[Path] = []  # per shard, for provenance listings (megamobi.replay)
        self.directory_starts: dict[str, tuple[int, int]] = {}  # path as given -> (first index, samples)
        counts: list[int] = []
        for directory in map(Path, paths):
            first_index = sum(counts)
            manifest_path = directory / MANIFEST_NAME
            if not manifest_path.is_file():
                raise ShardError(f"{manifest_path}: missing; {directory} is not a finished shard "
                                 f"directory ({_FIX_HINT})")
            manifest = read_json(manifest_path)
            if manifest.get("format") != FORMAT_NAME or manifest.get("seq_length") != SEQ_LEN:
                raise ShardError(f"{manifest_path}: not a megamobi shard manifest with seq_length "
                                 f"{SEQ_LEN}")
            local_to_global = np.array([self._global_source(n) for n in manifest["sources"]] or [0],
                                       dtype=np.int64)
            for record in manifest["shards"]:
                problems = shard_problems(directory, record, checksums=verify_checksums)
                if problems:
                    raise ShardError(f"shard {record['name']} in {directory} refused: "
                                     + "; ".join(problems) + f". To fix: {_FIX_HINT}")
                n = record["num_samples"]
                self._bins.append(ShardBin(directory / record["files"]["bin"]["file"], num_samples=n))
                self._src_files.append(directory / record["files"]["src"]["file"])
                self._src_maps.append(local_to_global)
                self.bin_paths.append(directory / record["files"]["bin"]["file"])
                counts.append(n)
            self.directory_starts[str(directory)] = (first_index, sum(counts) - first_index)
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def _global_source(self, name: str) -> int:
        if name not in self.sources:
            self.sources.append(name)
        return self.sources.index(name)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard, row)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return shard, index - int(self._offsets[shard])

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = self.locate(int(index))
        return self._bins[shard][row]

    def source_of(self, index: int) -> int:
        """Global source id of one sample (reads one entry of its shard's source file)."""
        shard, row = self.locate(int(index))
        return int(self._src_maps[shard][np.load(self._src_files[shard], mmap_mode="r")[row]])

    def shard_sources(self, shard: int) -> np.ndarray:
        """Local source ids of one shard's rows (its .src.npy, memory-mapped once)."""
        if shard not in self._src_mmaps:
            self._src_mmaps[shard] = np.load(self._src_files[shard], mmap_mode="r")
        return self._src_mmaps[shard]

    def sources_at(self, indices: np.ndarray) -> np.ndarray:
        """Global source id of each sample index (vectorised): a shard with many rows asked for (1 in
        64 or more: a replayed checkpoint interval) is read whole, sequentially; a few rows come from
        its memory map."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty_like(indices)
        if not indices.size:
            return out
        shards = np.searchsorted(self._offsets, indices, side="right") - 1
        order = np.argsort(shards, kind="stable")
        grouped = shards[order]
        cuts = np.flatnonzero(np.diff(grouped)) + 1
        for first, last in zip(np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])):
            shard = int(grouped[first])
            chosen = order[first:last]
            rows = indices[chosen] - self._offsets[shard]
            if len(chosen) * 64 >= self._offsets[shard + 1] - self._offsets[shard]:
                local = np.fromfile(self._src_files[shard], dtype="<u2", offset=self._src_offset(shard))[rows]
            else:  # a few rows: from the memory map
                local = self.shard_sources(shard)[rows]
            out[chosen] = self._src_maps[shard][np.asarray(local, dtype=np.int64)]
        return out

    def _src_offset(self, shard: int) -> int:
        """Where a shard's .src.npy array starts (the .npy header's length; mapping touches no page)."""
        if shard not in self._src_data_offsets:
            self._src_data_offsets[shard] = int(np.load(self._src_files[shard], mmap_mode="r").offset)
        return self._src_data_offsets[shard]

    def sources_between(self, first: int, last: int) -> np.ndarray:
        """Global source ids of samples [first, last), read with pread (no memory map: a long-running
        rank reading a block here and there does not accumulate mapped pages, which the kernel's
        read-ahead makes large)."""
        parts = []
        shard = int(np.searchsorted(self._offsets, first, side="right")) - 1
        while first < last:
            start, stop = first - int(self._offsets[shard]), min(last, int(self._offsets[shard + 1])) - int(self._offsets[shard])
            with open(self._src_files[shard], "rb") as stream:
                raw = os.pread(stream.fileno(), (stop - start) * 2, self._src_offset(shard) + start * 2)
            parts.append(self._src_maps[shard][np.frombuffer(raw, dtype="<u2").astype(np.int64)])
            first += stop - start
            shard += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def sample_sources(self) -> np.ndarray:
        """Global source id of every sample (int64, one entry per sample). O(N): used only for
        blending and per-source statistics, never at plain start-up."""
        parts = [mapping[np.load(path)] for path, mapping in zip(self._src_files, self._src_maps)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
