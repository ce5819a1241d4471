"""Which tokens a run trained on, step by step: the data order replayed from a run directory.

A run's order is a pure function of its data config and batch sizes (megamobi/data/sampler.py):
global position p of a segment of training (steps trained under one config, between resumes) is
window perm_e(p mod W) of epoch e = p div W, W = training windows; step k covers positions
[c0 + (k - first) * GB, ...), rank r the contiguous slice r * GB / D of it, in micro-batches of MB.
Every checkpoint records the segments that led to it (`data_provenance` in megamobi.json; derived
from the chain of checkpoints for older ones), so the answer needs nothing but the run directory
and the shards. The inverse runs the same maps backwards (the Feistel permutation is a bijection):
one sample -> the positions of its windows, without scanning an epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest
from megamobi.checkpointing.recorded_paths import LAUNCH_DIR_KEY, resolve_recorded, where_to_run
from megamobi.files import sha256_file

from .errors import DataError
from .indexed_format import SEQ_LEN, TOKEN_DTYPE
from .manifest import MANIFEST_NAME as SHARD_MANIFEST
from .sampler import epoch_permutation
from .shard_dataset import ShardedDataset
from .subsets import BlendedDataset, split_train_val

PROVENANCE_KEY = "data_provenance"


class ReplayError(DataError):
    """The run directory cannot answer the question (missing checkpoints, changed shards, bad range)."""


@dataclasses.dataclass(frozen=True)
class Segment:
    """Optimizer steps first_step..last_step (1-based, as logged), trained under one data config and layout."""

    first_step: int
    last_step: int
    consumed_samples_before: int  # training sequences consumed before first_step
    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    seq_len: int
    data: dict[str, Any]  # paths, source_weights, val_fraction, seed (as in the run config)
    data_manifests: dict[str, str]  # shard directory -> sha256 of its manifest.json
    data_changed: list[str] = dataclasses.field(default_factory=list)  # accepted on resume at first_step
    # The data stage (megamobi/data/stages.py) of these steps: 0-based index, name, and the samples
    # consumed when the stage began (its own order counts positions from there). 0 / None / 0 for runs
    # without data.stages and for checkpoints from before stages.
    stage: int = 0
    stage_name: str | None = None
    stage_start_samples: int = 0
    # Steps whose update was refused (bad data judged by a re-run, or a non-finite / spiking step that
    # was skipped): their samples were consumed but never trained on (docs/reliability.md).
    skipped_steps: list[int] = dataclasses.field(default_factory=list)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Segment:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record})

    def to_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def position(self, step: int) -> int:
        """First position of optimizer step `step` in its stage's order."""
        return self.consumed_samples_before - self.stage_start_samples + (step - self.first_step) * self.global_batch_size

    @property
    def end_position(self) -> int:
        return self.position(self.last_step + 1)

    def data_key(self) -> str:
        return json.dumps({"data": self.data, "seq_len": self.seq_len, "manifests": self.data_manifests}, sort_keys=True)

    def continues(self, other: Segment) -> bool:
        """True when `other` (the next segment) trains on under the very same settings: one segment."""
        same = {f.name for f in dataclasses.fields(self)} - {"first_step", "last_step", "consumed_samples_before",
                                                             "data_changed", "skipped_steps"}
        return (not other.data_changed and other.first_step == self.last_step + 1
                and other.position(other.first_step) == self.end_position
                and all(getattr(self, n) == getattr(other, n) for n in same))


def merge_segments(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].continues(segment):
            merged[-1] = dataclasses.replace(merged[-1], last_step=segment.last_step,
                                             skipped_steps=[*merged[-1].skipped_steps, *segment.skipped_steps])
        else:
            merged.append(segment)
    return merged


def truncate_segments(segments: list[Segment], *, last_step: int) -> list[Segment]:
    kept = [s for s in segments if s.first_step <= last_step]
    if kept and kept[-1].last_step > last_step:
        kept[-1] = dataclasses.replace(kept[-1], last_step=last_step,
                                       skipped_steps=[k for k in kept[-1].skipped_steps if k <= last_step])
    return kept


# --------------------------------------------------------------------------- checkpoints -> segments
def read_checkpoint_manifests(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """(checkpoint dir, megamobi.json) of every complete checkpoint, by step."""
    found = []
    for path in complete_checkpoints(run_dir):
        try:
            manifest = read_manifest(path)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # damaged: not part of any answer
        if isinstance(manifest.get("step"), int):
            found.append((path, manifest))
    return sorted(found, key=lambda item: item[1]["step"])


def segment_of_checkpoint(manifest: dict, *, first_step: int, consumed_samples_before: int) -> Segment | None:
    """The segment that ends at this checkpoint, from what it recorded (its run config and layout)."""
    run = manifest.get("run_config")
    if not isinstance(run, dict) or "data" not in run or "batch" not in run:
        return None
    batch = run["batch"]
    return Segment(first_step=first_step, last_step=manifest["step"], consumed_samples_before=consumed_samples_before,
                   global_batch_size=batch["global_batch_size"], micro_batch_size=batch["micro_batch_size"],
                   data_parallel_size=(manifest.get("layout") or {}).get("data", 1),
                   seq_len=batch.get("seq_len", SEQ_LEN - 1), data=_data_fields(run["data"]),
                   data_manifests=dict(manifest.get("data_manifests") or {}))


def _data_fields(data: dict) -> dict:
    return {"paths": list(data["paths"]), "source_weights": data.get("source_weights"),
            "val_fraction": data.get("val_fraction", 0.0), "seed": data.get("seed", 1234)}


def checkpoint_segments(run_dir: str | Path, manifest: dict) -> list[Segment]:
    """The segments that led to a checkpoint: recorded in it, or (checkpoints written before the
    record existed) derived from the chain of checkpoints up to it, each covering the steps since the
    previous one with its own layout and config."""
    if PROVENANCE_KEY in manifest:
        return [Segment.from_record(r) for r in manifest[PROVENANCE_KEY]]
    segments, previous_step, previous_consumed = [], 0, 0
    for _, m in read_checkpoint_manifests(run_dir):
        if m["step"] > manifest["step"]:
            break
        segment = segment_of_checkpoint(m, first_step=previous_step + 1, consumed_samples_before=previous_consumed)
        if segment is None:
            continue
        segments.append(segment)
        previous_step, previous_consumed = m["step"], m.get("consumed_samples", segment.end_position)
    return merge_segments(segments)


# --------------------------------------------------------------------------- one data config
class TrainOrder:
    """The shuffled training windows of one data config, as the trainer builds them
    (megamobi.data.build_datasets + training.data_stream.Windows + GlobalBatchSampler)."""

    def __init__(self, segment: Segment, *, verify_checksums: bool = False, launch_dir: str | None = None) -> None:
        data = segment.data
        self.seed = data.get("shuffle_seed", data["seed"])  # a data stage's own order (megamobi/data/stages.py)
        self.seq_len = segment.seq_len
        paths = [resolve_recorded(p, launch_dir=launch_dir) for p in data["paths"]]
        self.base = ShardedDataset(paths, verify_checksums=verify_checksums)
        self.train, self.val = split_train_val(self.base, val_fraction=data["val_fraction"], seed=data["seed"])
        weights = data.get("source_weights")
        self.blend = BlendedDataset(self.train, weights=weights) if weights is not None else None
        self.per_sample = (SEQ_LEN - 1) // self.seq_len
        self.num_windows = len(self.blend if self.blend is not None else self.train) * self.per_sample
        if not self.num_windows:
            raise ReplayError(f"{data['paths']}: no training samples")
        self._natural: dict[str, float] | None = None

    def _picks(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (pick in the training view, window within the sample)."""
        positions = np.asarray(positions, dtype=np.int64)
        windows = np.empty_like(positions)
        epochs = positions // self.num_windows
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            perm = epoch_permutation(num_samples=self.num_windows, seed=self.seed, epoch=int(epoch))
            windows[mask] = perm(positions[mask] % self.num_windows)
        return np.divmod(windows, self.per_sample)

    def windows_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global positions -> (base sample index, token offset of the window)."""
        picks, window = self._picks(positions)
        subset = self.blend.subset_indices(picks) if self.blend is not None else picks
        return self.train.base_indices_of(subset), window * self.seq_len

    def sources_at(self, positions: np.ndarray) -> np.ndarray:
        """Global source id of the window at each global position (a blend knows it without a shard read)."""
        picks, _ = self._picks(positions)
        if self.blend is not None:
            return self.blend.sources_at(picks)
        return self.base.sources_at(self.train.base_indices_of(picks))

    def positions_of(self, base_index: int, *, start: int, stop: int) -> list[tuple[int, int]] | None:
        """(position, offset) of every window of base sample `base_index` consumed at positions
        [start, stop); None when the sample is in the validation split."""
        subset = self.train.subset_index(base_index)
        if subset is None:
            return None
        picks = self.blend.positions_of(subset) if self.blend is not None else [subset]
        found = []
        first_epoch, last_epoch = start // self.num_windows, (stop - 1) // self.num_windows
        for epoch in range(first_epoch, last_epoch + 1):
            perm = epoch_permutation(num_samples=self.num_windows, seed=self.seed, epoch=epoch)
            windows = np.array([p * self.per_sample + j for p in picks for j in range(self.per_sample)], dtype=np.int64)
            if not len(windows):
                continue
            positions = epoch * self.num_windows + perm.inverse(windows)
            for position, window in zip(positions.tolist(), windows.tolist()):
                if start <= position < stop:
                    found.append((position, (window % self.per_sample) * self.seq_len))
        return sorted(found)

    def _shard_sources(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """Global source ids of one shard's rows (its .src.npy, memory-mapped once)."""
        return self.base.shard_sources(shard), self.base._src_maps[shard]

    def sources_of(self, bases: np.ndarray) -> np.ndarray:
        """Global source id of each base sample; reads only the rows involved (no O(corpus) array)."""
        return self.base.sources_at(bases)

    def natural_mix(self) -> dict[str, float]:
        """Source shares of the training split (what an unblended run consumes on average): the split's
        blocks summed in the blend's per-block source table (megamobi/data/blend_index.py, cached)."""
        if self._natural is None:
            from .blend_index import block_source_counts

            table = block_source_counts(self.base, block_size=self.train._block_size)
            counts = np.asarray(table[self.train._blocks].sum(axis=0, dtype=np.int64))[:len(self.base.sources)]
            self._natural = {n: float(c) / max(int(counts.sum()), 1) for n, c in zip(self.base.sources, counts)}
        return self._natural

    def windows_tokens(self, shards: np.ndarray, rows: np.ndarray, offsets: np.ndarray, *, length: int) -> np.ndarray:
        """(n, length) tokens of n windows: row rows[i] of shard shards[i] from token offsets[i]."""
        out = np.empty((len(rows), length), dtype=TOKEN_DTYPE)
        columns = np.arange(length)
        for shard in np.unique(shards):
            mask = shards == shard
            tokens = self.base._bins[int(shard)].rows(rows[mask])  # (picks, SEQ_LEN), each row read once
            out[mask] = np.take_along_axis(tokens, offsets[mask][:, None] + columns[None, :], axis=1)
        return out

    def locate(self, base_index: int) -> tuple[Path, int]:
        shard, row = self.base.locate(base_index)
        return self.base.bin_paths[shard], row

    def base_index_of(self, location: str) -> int | None:
        """SHARD_DIR:ROW (the ROW-th sample of that directory) or SHARD.bin:ROW -> base index; None when
        that directory or file is not part of this data config."""
        path, _, row_text = location.rpartition(":")
        try:
            row = int(row_text)
        except ValueError:
            raise ReplayError(f"--find {location!r}: expected SHARD_DIR:ROW or SHARD.bin:ROW with an integer ROW") from None
        target = Path(path)
        if target.suffix == ".bin":
            for shard, bin_path in enumerate(self.base.bin_paths):
                if _same_file(bin_path, target):
                    n = len(self.base._bins[shard])
                    if not 0 <= row < n:
                        raise ReplayError(f"--find {location}: {target} has rows 0..{n - 1}")
                    return int(self.base._offsets[shard]) + row
            return None
        for directory, (first, count) in self.base.directory_starts.items():
            if _same_file(Path(directory), target):
                if not 0 <= row < count:
                    raise ReplayError(f"--find {location}: {directory} has samples 0..{count - 1}")
                return first + row
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# --------------------------------------------------------------------------- a whole run
@dataclasses.dataclass
class Sequence:
    step: int
    stage: int  # the data stage, counted from 1 (1 for runs without data.stages)
    rank: int
    micro_batch: int
    sample_index: int
    shard: str
    row: int
    offset: int
    source: str
    tokens: list[int]
    skipped: bool = False  # the step's update was refused: consumed, never trained on

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunReplay:
    """Answers from a run directory: its newest complete checkpoint's segments + the shards on disk."""

    def __init__(self, run_dir: str | Path, *, verify_checksums: bool = False,
                 checkpoint: tuple[Path, dict] | None = None, orders: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise ReplayError(f"{run_dir}: no such run directory")
        if checkpoint is None:
            checkpoints = read_checkpoint_manifests(self.run_dir)
            if not checkpoints:
                raise ReplayError(f"{run_dir}: no complete checkpoint in {self.run_dir / 'checkpoints'}; replay reads "
                                  "the run's data config from its checkpoints")
            checkpoint = checkpoints[-1]
        self.checkpoint, manifest = checkpoint
        self.launch_dir = manifest.get(LAUNCH_DIR_KEY)  # relative data paths are relative to it
        self.segments = checkpoint_segments(self.run_dir, manifest)
        if not self.segments:
            raise ReplayError(f"{self.checkpoint}: records no run config; cannot replay its data order")
        self.last_step = self.segments[-1].last_step
        self.verify_checksums = verify_checksums
        self._orders: dict[str, TrainOrder] = {} if orders is None else orders  # shared between checkpoints

    def order(self, segment: Segment) -> TrainOrder:
        key = segment.data_key()
        if key not in self._orders:
            check_data_unchanged(segment, where=f"steps {segment.first_step}-{segment.last_step} of {self.run_dir}",
                                 launch_dir=self.launch_dir)
            self._orders[key] = TrainOrder(segment, verify_checksums=self.verify_checksums, launch_dir=self.launch_dir)
        return self._orders[key]

    def check_steps(self, first: int, last: int) -> None:
        if not 1 <= first <= last:
            raise ReplayError(f"steps {first}:{last}: need 1 <= A <= B (optimizer steps count from 1, as logged)")
        if last > self.last_step:
            raise ReplayError(f"step {last}: the newest checkpoint ({self.checkpoint.name}) covers steps 1..{self.last_step}; "
                              "steps after it are recorded by no checkpoint yet")
        if first < self.segments[0].first_step:
            raise ReplayError(f"step {first}: the checkpoints of {self.run_dir} record steps from "
                              f"{self.segments[0].first_step} on")

    def _overlapping(self, first: int, last: int) -> Iterator[tuple[Segment, int, int]]:
        for segment in self.segments:
            lo, hi = max(first, segment.first_step), min(last, segment.last_step)
            if lo <= hi:
                yield segment, lo, hi

    def sequences(self, first: int, last: int, *, rank: int | None = None) -> Iterator[Sequence]:
        """Each step's sequences, rank by rank, in the order each rank consumed them."""
        self.check_steps(first, last)
        for segment, lo, hi in self._overlapping(first, last):
            order = self.order(segment)
            d, mb, gb = segment.data_parallel_size, segment.micro_batch_size, segment.global_batch_size
            per_rank = gb // d
            if rank is not None and not 0 <= rank < d:
                raise ReplayError(f"--rank {rank}: steps {lo}-{hi} ran with {d} data-parallel rank(s) (0..{d - 1})")
            ranks = range(d) if rank is None else [rank]
            for step in range(lo, hi + 1):
                # One vectorised read per step: every asked rank's windows, their shards, rows, sources
                # and tokens (a (n, seq_len + 1) array turned into lists by numpy, not token by token).
                start = segment.position(step)
                positions = np.concatenate([np.arange(start + r * per_rank, start + (r + 1) * per_rank, dtype=np.int64)
                                            for r in ranks])
                bases, offsets = order.windows_at(positions)
                shards = np.searchsorted(order.base._offsets, bases, side="right") - 1
                rows = bases - order.base._offsets[shards]
                sources = order.sources_of(bases)
                tokens = order.windows_tokens(shards, rows, offsets, length=segment.seq_len + 1)
                skipped = step in segment.skipped_steps
                for i, (base, shard, row, offset, source, window) in enumerate(zip(
                        bases.tolist(), shards.tolist(), rows.tolist(), offsets.tolist(), sources.tolist(), tokens.tolist())):
                    r, within = ranks[i // per_rank], i % per_rank
                    yield Sequence(step=step, stage=segment.stage + 1, rank=r, micro_batch=within // mb, sample_index=base,
                                   shard=str(order.base.bin_paths[shard]), row=row, offset=offset,
                                   source=order.base.sources[source], tokens=window, skipped=skipped)

    def find(self, location: str) -> dict[str, Any]:
        """Where one sample's windows were consumed: {"sample_index", "shard", "row", "source",
        "validation": bool, "consumed": [{"step", "stage", "rank", "micro_batch", "offset"}]}."""
        answer: dict[str, Any] | None = None
        for segment in self.segments:
            order = self.order(segment)
            base = order.base_index_of(location)
            if base is None:
                continue  # a segment trained on other directories (a change allowed with data.allow_change)
            shard, row = order.locate(base)
            if answer is None:
                answer = {"sample_index": base, "shard": str(shard), "row": row,
                          "source": order.base.sources[int(order.sources_of([base])[0])], "validation": False,
                          "consumed": []}
            first = segment.position(segment.first_step)
            hits = order.positions_of(base, start=first, stop=segment.end_position)
            if hits is None:
                answer["validation"] = True
                continue
            for position, offset in hits:
                step_index, within = divmod(position - first, segment.global_batch_size)
                r, in_rank = divmod(within, segment.global_batch_size // segment.data_parallel_size)
                step = segment.first_step + step_index
                answer["consumed"].append({"step": step, "stage": segment.stage + 1, "rank": r,
                                           "micro_batch": in_rank // segment.micro_batch_size, "offset": offset,
                                           "skipped": step in segment.skipped_steps})
        if answer is None:
            paths = sorted({p for segment in self.segments for p in segment.data["paths"]})
            raise ReplayError(f"--find {location}: not a shard directory or .bin file of this run's data {paths}")
        answer["consumed"].sort(key=lambda hit: (hit["step"], hit["rank"], hit["micro_batch"], hit["offset"]))
        return answer

    def _segment_tokens(self, segment: Segment, lo: int, hi: int, *, chunk: int) -> dict[str, int]:
        """Tokens per source trained on by steps lo..hi of one segment (its skipped steps left out)."""
        order = self.order(segment)
        tokens: dict[str, int] = {}
        for start, stop in _trained_ranges(segment, lo, hi):
            for begin in range(start, stop, chunk):
                sources = order.sources_at(np.arange(begin, min(begin + chunk, stop), dtype=np.int64))
                counts = np.bincount(sources, minlength=len(order.base.sources))
                for name, count in zip(order.base.sources, counts.tolist()):
                    if count:
                        tokens[name] = tokens.get(name, 0) + count * segment.seq_len
        return tokens

    def _configured(self, segment: Segment) -> dict[str, float]:
        weights = segment.data.get("source_weights")
        if weights is None:
            return self.order(segment).natural_mix()
        total_weight = sum(weights.values())
        return {n: w / total_weight for n, w in weights.items()}

    def mix(self, first: int, last: int, *, chunk: int = 1 << 20) -> dict[str, Any]:
        """Tokens trained on per source over steps first..last (seq_len per sequence, as consumed_tokens
        counts them; skipped steps' samples are not counted), per data stage and in total, beside what
        was configured: each stage's blend (or natural mix) as of its last segment in the range; in
        total, the stages' configured mixes weighted by the tokens each stage consumed in the range."""
        self.check_steps(first, last)
        stages: list[dict[str, Any]] = []
        for segment, lo, hi in self._overlapping(first, last):
            tokens = self._segment_tokens(segment, lo, hi, chunk=chunk)
            if not stages or stages[-1]["stage"] != segment.stage + 1:
                stages.append({"stage": segment.stage + 1, "name": segment.stage_name, "first_step": lo, "tokens": {}})
            part = stages[-1]
            part["last_step"], part["segment"] = hi, segment
            for name, count in tokens.items():
                part["tokens"][name] = part["tokens"].get(name, 0) + count
        total_tokens: dict[str, int] = {}
        total_configured: dict[str, float] = {}
        for part in stages:
            segment = part.pop("segment")
            configured, counts = self._configured(segment), part.pop("tokens")
            part.update(_mix_table(counts, configured), blend="weights" if segment.data.get("source_weights") is not None else "natural")
            for name, count in counts.items():
                total_tokens[name] = total_tokens.get(name, 0) + count
            for name, share in configured.items():
                total_configured[name] = total_configured.get(name, 0.0) + share * part["tokens"]
        total = sum(total_tokens.values())
        total_configured = {n: v / total if total else 0.0 for n, v in total_configured.items()}
        blend = stages[0]["blend"] if len(stages) == 1 else "stages"
        return {"first_step": first, "last_step": last, **_mix_table(total_tokens, total_configured), "blend": blend,
                "stages": stages}


def _mix_table(tokens: dict[str, int], configured: dict[str, float]) -> dict[str, Any]:
    total = sum(tokens.values())
    names = list(dict.fromkeys([*tokens, *configured]))
    return {"tokens": total, "sources": {n: {"tokens": tokens.get(n, 0), "share": tokens.get(n, 0) / total if total else 0.0,
                                             "configured": configured.get(n, 0.0)} for n in names}}


def _trained_ranges(segment: Segment, first: int, last: int) -> list[tuple[int, int]]:
    """Position ranges of steps first..last of a segment, without its skipped steps."""
    ranges, start = [], first
    for skipped in sorted(k for k in set(segment.skipped_steps) if first <= k <= last):
        if skipped > start:
            ranges.append((segment.position(start), segment.position(skipped)))
        start = skipped + 1
    if start <= last:
        ranges.append((segment.position(start), segment.position(last + 1)))
    return ranges


def check_data_unchanged(segment: Segment, *, where: str, launch_dir: str | None = None) -> None:
    """Refuse shard directories whose manifest.json is not the one the run recorded."""
    for path in segment.data["paths"]:
        manifest = resolve_recorded(path, launch_dir=launch_dir) / SHARD_MANIFEST
        if not manifest.is_file():
            raise ReplayError(f"{path}: no {SHARD_MANIFEST} (the run's data for {where}); replay needs the shards the "
                              f"run trained on, at the recorded path ({where_to_run(path, launch_dir=launch_dir)})")
        recorded = segment.data_manifests.get(path)
        if recorded is None:
            continue  # a checkpoint that did not record it: nothing to compare against
        actual = sha256_file(manifest)
        if actual != recorded:
            raise ReplayError(f"{path}: the shards changed since the run trained on them ({manifest} sha256 "
                              f"{actual[:12]}..., the checkpoints recorded {recorded[:12]}... for {where}); "
                              "replay would list other tokens than the run saw. Restore the original shards.")


MIX_CACHE_NAME = ".consumed_mix.json"  # in the run directory: each checkpoint's consumed tokens per source


def _history_key(segments: list[Segment]) -> str:
    """What a checkpoint's consumed mix depends on: its recorded segments (configs, layouts, steps,
    skipped steps, the shards' manifest checksums)."""
    return hashlib.sha256(json.dumps([s.to_record() for s in segments], sort_keys=True).encode()).hexdigest()


def _read_mix_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
        return cache if isinstance(cache, dict) and cache.get("version") == 1 else {"version": 1}
    except (OSError, ValueError):
        return {"version": 1}


def _write_mix_cache(path: Path, cache: dict) -> None:
    """Atomic (a unique temporary name, then rename); a read-only run directory keeps no cache."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def consumed_mixes(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Each checkpoint's consumed source shares over all its steps ({} per checkpoint whose data is
    unavailable or changed). Cumulative: each checkpoint adds the steps since the previous one when
    their recorded histories agree, so the whole table costs one pass over the run's positions; and
    cached in RUN_DIR/.consumed_mix.json (tokens per source, keyed by the checkpoint's recorded
    history), so a later call only replays the steps of checkpoints it has not seen."""
    cache_path = Path(run_dir) / MIX_CACHE_NAME
    cache = _read_mix_cache(cache_path)
    entries = cache.setdefault("checkpoints", {})
    changed = False
    result: dict[str, dict[str, float]] = {}
    orders: dict[str, TrainOrder] = {}
    previous: tuple[list[Segment], int, dict[str, int]] | None = None
    for path, manifest in read_checkpoint_manifests(run_dir):
        try:
            replay = RunReplay(run_dir, checkpoint=(path, manifest), orders=orders)
            key = _history_key(replay.segments)
            cached = entries.get(path.name)
            if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("tokens"), dict):
                tokens = {str(n): int(t) for n, t in cached["tokens"].items()}
            else:
                tokens = {}
                first = replay.segments[0].first_step
                if previous is not None and truncate_segments(replay.segments, last_step=previous[1]) == previous[0]:
                    tokens, first = dict(previous[2]), previous[1] + 1
                if first <= replay.last_step:
                    for name, entry in replay.mix(first, replay.last_step)["sources"].items():
                        tokens[name] = tokens.get(name, 0) + entry["tokens"]
                entries[path.name], changed = {"key": key, "tokens": tokens}, True
        except (DataError, OSError, KeyError, ValueError):
            result[path.name], previous = {}, None
            continue
        total = sum(tokens.values())
        result[path.name] = {n: t / total for n, t in tokens.items() if t} if total else {}
        previous = (replay.segments, replay.last_step, tokens)
    if changed:
        _write_mix_cache(cache_path, cache)
    return result
