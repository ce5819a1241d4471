"""Views over a ShardedDataset: block subsets (train/validation split) and source blending."""
import numpy as np

from .errors import DataConfigError
from .permutation import FeistelPermutation

MAX_SPLIT_BLOCKS = 1 << 20  # bounds split bookkeeping to ~8 MB whatever the corpus size


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
        k = np.searchsorted(self._offsets, indices, side="right") - 1
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
    """Re-weights sources like Megatron's BlendedDataset, with a deterministic index:
    source s gets n_s = share of len(base) samples (largest remainder); its k-th pick is placed at
    "time" (k + 0.5) / n_s and all picks are merged by time, so every prefix of the blended order
    has close to the requested proportions. Pick k of source s is the (k mod size_s)-th sample of s
    in base order (upsampling repeats a source, downsampling uses a prefix of it). Built with numpy
    in O(N log N); holds one int64 per sample."""

    def __init__(self, base, *, weights: dict[str, float], size: int | None = None) -> None:
        unknown = sorted(set(weights) - set(base.sources))
        if unknown:
            raise DataConfigError(f"source_weights names unknown sources {unknown}; "
                                  f"the data has {base.sources}")
        if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
            raise DataConfigError(f"source_weights must be >= 0 with a positive sum, got {weights}")
        self.base = base
        self.sources = base.sources
        size = len(base) if size is None else size
        sample_sources = base.sample_sources()
        names = [n for n in base.sources if weights.get(n, 0) > 0]
        shares = np.array([weights[n] for n in names], dtype=np.float64)
        shares = shares / shares.sum() * size
        counts = np.floor(shares).astype(np.int64)
        remainder_order = np.argsort(-(shares - counts), kind="stable")
        counts[remainder_order[: size - counts.sum()]] += 1
        times, picks = [], []
        for name, count in zip(names, counts):
            members = np.flatnonzero(sample_sources == base.sources.index(name))
            if count and not len(members):
                raise DataConfigError(f"source {name!r} has weight {weights[name]} but no samples")
            k = np.arange(count, dtype=np.int64)
            times.append((k + 0.5) / max(count, 1))
            picks.append(members[k % len(members)] if count else k)
        order = np.argsort(np.concatenate(times), kind="stable")
        self._index = np.concatenate(picks)[order] if picks else np.zeros(0, dtype=np.int64)
        self.realised_counts = dict(zip(names, counts.tolist()))
        self._names = names
        self._members: dict[str, np.ndarray] | None = None  # per source, built on first inverse query

    @property
    def index(self) -> np.ndarray:
        """Blended position -> base index (read-only view)."""
        view = self._index.view()
        view.flags.writeable = False
        return view

    def positions_of(self, base_index: int) -> list[int]:
        """Every blended position that picks base sample `base_index` (none when its source is weighted
        0 or downsampled past it, several when upsampled), without scanning the index: pick k of
        source s sits at the rank of its time (k + 0.5) / n_s among all picks, ties broken by source
        order then k, exactly as the stable argsort of the constructor orders them."""
        if self._members is None:
            sample_sources = self.base.sample_sources()
            self._members = {n: np.flatnonzero(sample_sources == self.base.sources.index(n)) for n in self._names}
        found = [(s, name, int(np.searchsorted(self._members[name], base_index))) for s, name in enumerate(self._names)]
        found = [(s, name, q) for s, name, q in found
                 if q < len(self._members[name]) and self._members[name][q] == base_index]
        if not found:
            return []
        [(s, name, q)] = found  # a sample has one source
        members = self._members[name]
        n_s = self.realised_counts[name]
        positions = []
        for k in range(q, n_s, len(members)):
            time = (k + 0.5) / n_s
            position = k
            for other_index, other in enumerate(self._names):
                if other_index != s:
                    position += _picks_before(self.realised_counts[other], time, ties_first=other_index < s)
            positions.append(position)
        return positions

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.base[int(self._index[index])]

    def sample_sources(self) -> np.ndarray:
        return self.base.sample_sources()[self._index]


def _picks_before(count: int, time: float, *, ties_first: bool) -> int:
    """How many of a source's `count` picks, at times (k + 0.5) / count, sort before `time`
    (binary search with the constructor's own float expression, so ties are found exactly)."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        t = (mid + 0.5) / count
        if t < time or (ties_first and t == time):
            lo = mid + 1
        else:
            hi = mid
    return lo
