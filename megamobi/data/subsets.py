"""Views over a ShardedDataset: block subsets (train/validation split) and source blending."""
import numpy as np

from .errors import DataConfigError
from .permutation import FeistelPermutation

MAX_SPLIT_BLOCKS = 1 << 20  # bounds split bookkeeping to ~8 MB whatever the corpus size
_MERGE_CHUNK = 1 << 16  # positions merged at a time: 3.5x faster than 1M at once (memory-bound numpy)


class BlockSubset:
    """The samples of a chosen set of equal-size blocks [b*B, (b+1)*B) of `base`, in order."""

    def __init__(self, base, *, block_size: int, blocks: np.ndarray) -> None:
        self.base = base
        self.sources = base.sources
        self._block_size = block_size
        self._blocks = np.sort(np.asarray(blocks, dtype=np.int64))
        sizes = np.minimum(block_size, len(base) - self._blocks * block_size)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def base_index(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return int(self._blocks[k]) * self._block_size + index - int(self._offsets[k])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.base[self.base_index(int(index))]

    def base_indices_of(self, indices: np.ndarray) -> np.ndarray:
        """Vectorised base_index: subset indices -> base indices."""
        indices = np.asarray(indices, dtype=np.int64)
        # Every block holds block_size samples but the corpus's last, which sorts last: the k-th
        # block of the subset starts at k * block_size (no search over the offsets).
        k = indices // self._block_size
        return self._blocks[k] * self._block_size + indices - self._offsets[k]

    def subset_index(self, base_index: int) -> int | None:
        """Inverse of base_index: the subset index of a base sample, None when it is not in the subset."""
        block = base_index // self._block_size
        k = int(np.searchsorted(self._blocks, block))
        if k == len(self._blocks) or int(self._blocks[k]) != block:
            return None
        return int(self._offsets[k]) + base_index - block * self._block_size

    def base_indices(self) -> np.ndarray:
        """All base indices in order (O(len)); for blending."""
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        grid = self._blocks[:, None] * self._block_size + np.arange(self._block_size)[None, :]
        flat = grid.ravel()
        return flat[flat < len(self.base)]

    def sample_sources(self) -> np.ndarray:
        return self.base.sample_sources()[self.base_indices()]


def split_train_val(base, *, val_fraction: float, seed: int) -> tuple[BlockSubset, BlockSubset]:
    """Deterministic, disjoint split by seed. Samples are grouped in blocks of
    ceil(N / 2**20) (1 for corpora up to a million samples); a seeded permutation of the blocks
    puts the first round(val_fraction * blocks) into validation (at least one if fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(base)
    block_size = max(1, -(-n // MAX_SPLIT_BLOCKS))
    num_blocks = -(-n // block_size)
    num_val = round(val_fraction * num_blocks)
    if val_fraction > 0 and num_val == 0:
        num_val = 1
    if num_val and num_val >= num_blocks:
        raise DataConfigError(f"val_fraction {val_fraction} leaves no training data ({n} samples)")
    order = (FeistelPermutation(size=num_blocks, seed=seed ^ 0x5EED5A1) (np.arange(num_blocks))
             if num_blocks else np.zeros(0, dtype=np.int64))
    return (BlockSubset(base, block_size=block_size, blocks=order[num_val:]),
            BlockSubset(base, block_size=block_size, blocks=order[:num_val]))


class BlendedDataset:
    """Re-weights sources like Megatron's BlendedDataset, with a deterministic order:
    source s gets n_s = share of len(base) samples (largest remainder); its k-th pick is placed at
    "time" (k + 0.5) / n_s and all picks are merged by time (ties: source order), so every prefix of
    the blended order has close to the requested proportions. Pick k of source s is the
    (k mod size_s)-th sample of s in base order (upsampling repeats a source, downsampling uses a
    prefix of it).

    Nothing per sample is built: position -> (source, k) is computed per batch (the merge rank of a
    pick is known from its time, see _merge_picks), and "the q-th sample of source s" is found with
    the per-block source counts of megamobi/data/blend_index.py (cached next to the shards, memory-
    mapped) plus a read of that one block's source ids. The order is the same as the per-sample index
    this class held before (tests/data/test_blend_order.py compares them)."""

    def __init__(self, base, *, weights: dict[str, float], size: int | None = None) -> None:
        unknown = sorted(set(weights) - set(base.sources))
        if unknown:
            raise DataConfigError(f"source_weights names unknown sources {unknown}; "
                                  f"the data has {base.sources}")
        if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise DataConfigError(f"source_weights must be >= 0 with a positive sum, got {weights}")
        self.base = base
        self.sources = base.sources
        self._subset = base if isinstance(base, BlockSubset) else _whole(base)
        self._ranks = SourceRanks(self._subset)
        size = len(base) if size is None else size
        names = [n for n in base.sources if weights.get(n, 0) > 0]
        shares = np.array([weights[n] for n in names], dtype=np.float64)
        shares = shares / shares.sum() * size
        counts = np.floor(shares).astype(np.int64)
        remainder_order = np.argsort(-(shares - counts), kind="stable")
        counts[remainder_order[: size - counts.sum()]] += 1
        for name, count in zip(names, counts):
            if count and not self._ranks.size(base.sources.index(name)):
                raise DataConfigError(f"source {name!r} has weight {weights[name]} but no samples")
        self.realised_counts = dict(zip(names, counts.tolist()))
        self._names = names
        self._size = int(counts.sum())
        active = counts > 0  # sources with no pick take no part in the merge (nor in its ties)
        self._merge_counts = counts[active]
        self._merge_sources = np.array([base.sources.index(n) for n in names], dtype=np.int64)[active]

    def picks_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Blended positions -> (global source id, pick number k within that source)."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self._size):
            raise IndexError(f"blended positions must lie in [0, {self._size})")
        slot, k = np.empty_like(positions), np.empty_like(positions)
        for first in range(0, len(positions), _MERGE_CHUNK):  # (chunk, S) arrays that stay in the CPU's cache
            part = slice(first, first + _MERGE_CHUNK)
            slot[part], k[part] = _merge_picks(positions[part], self._merge_counts)
        return self._merge_sources[slot], k

    def sources_at(self, positions: np.ndarray) -> np.ndarray:
        """Global source id of each blended position (no shard read)."""
        return self.picks_at(positions)[0]

    def subset_indices(self, positions: np.ndarray) -> np.ndarray:
        """Blended positions -> indices into `base` (vectorised)."""
        sources, k = self.picks_at(positions)
        sizes = np.array([self._ranks.size(int(s)) for s in range(len(self.sources))], dtype=np.int64)
        return self._ranks.select(sources, k % np.maximum(sizes[sources], 1))

    def positions_of(self, base_index: int) -> list[int]:
        """Every blended position that picks base sample `base_index` (none when its source is weighted
        0 or downsampled past it, several when upsampled), without scanning: pick k of source s sits
        at the rank of its time (k + 0.5) / n_s among all picks, ties broken by source order then k,
        exactly as the merge orders them."""
        source, q = self._ranks.rank(base_index)
        name = self.sources[source]
        if name not in self._names:
            return []
        s = self._names.index(name)
        size_s = self._ranks.size(source)
        n_s = self.realised_counts[name]
        positions = []
        for k in range(q, n_s, size_s):
            time = (k + 0.5) / n_s
            position = k
            for other_index, other in enumerate(self._names):
                if other_index != s:
                    position += _picks_before(self.realised_counts[other], time, ties_first=other_index < s)
            positions.append(position)
        return positions

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._size:
            raise IndexError(f"sample {index} out of range [0, {self._size})")
        return self.base[int(self.subset_indices(np.array([index]))[0])]

    def sample_sources(self, *, chunk: int = 1 << 20) -> np.ndarray:
        """Global source id of every blended position (O(N); statistics and tests only)."""
        parts = [self.sources_at(np.arange(a, min(a + chunk, self._size))) for a in range(0, self._size, chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _whole(base) -> BlockSubset:
    """A dataset as the subset of all its blocks (blending applied to a dataset without a split)."""
    n = len(base)
    block_size = max(1, -(-n // MAX_SPLIT_BLOCKS))
    return BlockSubset(base, block_size=block_size, blocks=np.arange(-(-n // block_size), dtype=np.int64))


class SourceRanks:
    """Rank and select by source over a BlockSubset of a ShardedDataset: "the q-th sample of source s"
    and its inverse, from per-block source counts (cumulated over the subset's blocks: one int64 per
    block and source) plus a read of one block's source ids."""

    def __init__(self, subset: BlockSubset) -> None:
        from .blend_index import block_source_counts

        self._subset = subset
        self._shards = subset.base
        table = block_source_counts(self._shards, block_size=subset._block_size)
        self._cumulative = np.zeros((len(subset._blocks) + 1, table.shape[1]), dtype=np.int64)
        np.cumsum(table[subset._blocks], axis=0, out=self._cumulative[1:])

    def size(self, source: int) -> int:
        return int(self._cumulative[-1, source]) if source < self._cumulative.shape[1] else 0

    def _block_sources(self, block: int) -> np.ndarray:
        b = self._subset._block_size
        first = int(self._subset._blocks[block]) * b
        return self._shards.sources_between(first, min(first + b, len(self._shards)))

    def select(self, sources: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Subset index of the q-th sample (0-based, subset order) of source sources[i], for every i:
        the block from the cumulated counts, then the position in it from the block's source ids (one
        read per block involved)."""
        sources, q = np.asarray(sources, dtype=np.int64), np.asarray(q, dtype=np.int64)
        block = np.empty_like(q)
        for source in np.unique(sources):
            mask = sources == source
            block[mask] = np.searchsorted(self._cumulative[:, source], q[mask], side="right") - 1
        within = q - self._cumulative[block, sources]
        out = np.empty_like(q)
        order = np.argsort(block, kind="stable")
        cuts = np.flatnonzero(np.diff(block[order])) + 1
        for group in np.split(order, cuts) if len(order) else []:
            b = int(block[group[0]])
            ids = self._block_sources(b)
            for i in group.tolist():
                out[i] = self._subset._offsets[b] + np.flatnonzero(ids == sources[i])[within[i]]
        return out

    def rank(self, subset_index: int) -> tuple[int, int]:
        """(global source id, q): subset sample `subset_index` is the q-th sample of its source."""
        block = int(np.searchsorted(self._subset._offsets, subset_index, side="right")) - 1
        sources = self._block_sources(block)
        within = subset_index - int(self._subset._offsets[block])
        source = int(sources[within])
        return source, int(self._cumulative[block, source]) + int(np.count_nonzero(sources[:within] == source))


def _picks_before_all(counts: np.ndarray, times: np.ndarray) -> np.ndarray:
    """(P, S) number of picks of each source (count n at times (k + 0.5) / n) strictly before each of
    P times: ceil(t * n - 0.5) by arithmetic, checked against the exact float expression of a pick's
    time wherever rounding could matter (t * n - 0.5 within 1e-6 of an integer)."""
    n = counts[None, :]
    x = times[:, None] * n - 0.5
    c = np.clip(np.ceil(x), 0, n).astype(np.int64)
    rows, cols = np.nonzero(np.abs(x - np.rint(x)) < 1e-6)
    if rows.size:
        t, m, cc = times[rows], counts[cols], c[rows, cols]
        while True:  # float rounding moves the estimate by at most one
            down = (cc > 0) & ~((cc - 0.5) / m < t)
            up = (cc < m) & ((cc + 0.5) / m < t)
            if not (down.any() or up.any()):
                break
            cc = cc - down + up
        c[rows, cols] = cc
    return c


def _merge_picks(positions: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slot, k) of the pick at each merged position, for sources with `counts` picks each (all > 0)
    at times (k + 0.5) / n_s, merged by (time, slot). Source s has between t * n_s - 0.5 and
    t * n_s + 0.5 picks before time t, so at t = (p + 0.5) / N (N picks in all) the exact count of
    picks before t is within S / 2 of p: count them, then step forward (take the next pick by time)
    or backward (give back the last one) the few picks to position p. O(S^2) per position, vectorised."""
    total = max(int(counts.sum()), 1)
    k = _picks_before_all(counts, (positions + 0.5) / total)
    need = positions - k.sum(axis=1)
    n = counts[None, :]
    slot = np.empty(len(positions), dtype=np.int64)
    # behind: more picks taken than p; give back the last (latest time, highest slot on ties) until
    # exactly p remain: the last one given back is the pick at p.
    rows = np.flatnonzero(need < 0)
    while rows.size:
        kk = k[rows]
        times = np.where(kk > 0, (kk - 0.5) / n, -np.inf)
        last = times.shape[1] - 1 - times[:, ::-1].argmax(axis=1)  # highest slot among equal latest times
        k[rows, last] -= 1
        need[rows] += 1
        done = need[rows] == 0
        slot[rows[done]] = last[done]
        rows = rows[~done]
    # ahead: take the next picks (earliest time, lowest slot on ties) while fewer than p are taken;
    # then the next one is the pick at p.
    rows = np.flatnonzero(need >= 0)
    while rows.size:
        kk = k[rows]
        times = np.where(kk < n, (kk + 0.5) / n, np.inf)
        first = times.argmin(axis=1)
        done = need[rows] == 0
        slot[rows[done]] = first[done]
        rows, first = rows[~done], first[~done]
        k[rows, first] += 1
        need[rows] -= 1
    return slot, k[np.arange(len(positions)), slot]


def _picks_before(count: int, time: float, *, ties_first: bool) -> int:
    """How many of a source's `count` picks, at times (k + 0.5) / count, sort before `time`
    (binary search with the merge's own float expression, so ties are found exactly)."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        t = (mid + 0.5) / count
        if t < time or (ties_first and t == time):
            lo = mid + 1
        else:
            hi = mid
    return lo
