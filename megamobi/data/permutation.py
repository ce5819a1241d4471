"""A seeded bijection of [0, n) with O(1) random access: no per-epoch array is ever built.

Balanced Feistel network on 2*h bits (4**h >= n) with a splitmix64-style round function, plus
cycle walking: values >= n are fed through the network again until they land in [0, n). Because
4**h < 4n, fewer than 4 passes are needed on average. Vectorised over numpy arrays of positions.

The network is invertible round by round, and cycle walking backwards retraces the same chain of
out-of-range values, so `inverse` answers "at which position does value v appear" in O(1) too
(megamobi.replay's --find uses it instead of scanning an epoch).
"""
import numpy as np

_ROUNDS = 6
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixing 64-bit hash (uint64 arithmetic wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    def __init__(self, *, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError(f"permutation size must be >= 1, got {size}")
        self.size = size
        half_bits = max(1, (int(size - 1).bit_length() + 1) // 2)
        self._half_bits = np.uint64(half_bits)
        self._half_mask = np.uint64((1 << half_bits) - 1)
        keys = _mix(np.arange(1, _ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                    + np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
        self._keys = keys

    def _network(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half_bits, x & self._half_mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right ^ key) & self._half_mask)
        return (left << self._half_bits) | right

    def _inverse_network(self, y: np.ndarray) -> np.ndarray:
        left, right = y >> self._half_bits, y & self._half_mask
        for key in self._keys[::-1]:
            left, right = right ^ (_mix(left ^ key) & self._half_mask), left
        return (left << self._half_bits) | right

    def _walk(self, values, network) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = np.asarray(values, dtype=np.uint64)
            out = network(x)
            outside = out >= np.uint64(self.size)
            while outside.any():
                out[outside] = network(out[outside])
                outside = out >= np.uint64(self.size)
        return out.astype(np.int64)

    def inverse(self, values: np.ndarray) -> np.ndarray:
        """Positions at which `values` appear: inverse(perm(p)) == p for every p in [0, size)."""
        values = np.asarray(values, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() >= self.size):
            raise ValueError(f"values must lie in [0, {self.size})")
        return self._walk(values, self._inverse_network)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Permuted values of positions (each in [0, size)); int64 array in, int64 array out."""
        return self._walk(positions, self._network)
