"""The blended order as megamobi built it before issue 19: one int64 per sample, built by every rank
with an O(N log N) argsort (peak ~48 B per sample). Kept as the reference the new, index-free
BlendedDataset (megamobi/data/subsets.py) is compared with: tests/data/test_blend_order.py checks the
orders are equal, bench/scale.py measures the memory and time it needed."""

import numpy as np


def legacy_blend_index(sample_sources: np.ndarray, sources: list[str], weights: dict[str, float],
                       size: int | None = None) -> np.ndarray:
    """Blended position -> index into the dataset whose per-sample global source ids are given."""
    size = len(sample_sources) if size is None else size
    names = [n for n in sources if weights.get(n, 0) > 0]
    shares = np.array([weights[n] for n in names], dtype=np.float64)
    shares = shares / shares.sum() * size
    counts = np.floor(shares).astype(np.int64)
    remainder_order = np.argsort(-(shares - counts), kind="stable")
    counts[remainder_order[: size - counts.sum()]] += 1
    times, picks = [], []
    for name, count in zip(names, counts):
        members = np.flatnonzero(sample_sources == sources.index(name))
        k = np.arange(count, dtype=np.int64)
        times.append((k + 0.5) / max(count, 1))
        picks.append(members[k % len(members)] if count else k)
    order = np.argsort(np.concatenate(times), kind="stable")
    return np.concatenate(picks)[order] if picks else np.zeros(0, dtype=np.int64)
