"""Global-batch sampler: the order of samples depends only on (seed, num_samples).

Global position p (0, 1, 2, ...) maps to epoch e = p // N and sample perm_e(p % N), where perm_e is
a seeded Feistel bijection (O(1) per position, nothing materialised). Global step k covers positions
[k*GB, (k+1)*GB); data-parallel rank r takes the contiguous slice [r*GB/D, (r+1)*GB/D) of it and
yields it in micro-batches of MB. Changing D or MB therefore regroups the same global batches, and
resuming at consumed_samples=c (a multiple of GB) continues with step c // GB exactly.
"""
from collections.abc import Iterator

import numpy as np

from .errors import DataConfigError
from .permutation import FeistelPermutation

_EPOCH_SEED_STRIDE = 0x100000001B3  # FNV prime: spreads (seed, epoch) pairs over 64 bits


def epoch_permutation(*, num_samples: int, seed: int, epoch: int) -> FeistelPermutation:
    return FeistelPermutation(size=num_samples,
                              seed=(seed * _EPOCH_SEED_STRIDE + epoch) & 0xFFFFFFFFFFFFFFFF)


class GlobalBatchSampler:
    def __init__(self, *, num_samples: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, consumed_samples: int = 0) -> None:
        if num_samples < 1:
            raise DataConfigError(f"num_samples must be >= 1, got {num_samples} (empty dataset?)")
        if min(global_batch_size, micro_batch_size, dp_size) < 1:
            raise DataConfigError(f"global_batch_size ({global_batch_size}), micro_batch_size "
                                  f"({micro_batch_size}) and dp_size ({dp_size}) must be >= 1")
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataConfigError(
                f"global_batch_size {global_batch_size} must be divisible by micro_batch_size "
                f"{micro_batch_size} x dp_size {dp_size} = {micro_batch_size * dp_size}; "
                "change one of them so every rank gets whole micro-batches")
        if not 0 <= dp_rank < dp_size:
            raise DataConfigError(f"dp_rank {dp_rank} outside [0, dp_size={dp_size})")
        if consumed_samples < 0 or consumed_samples % global_batch_size:
            raise DataConfigError(
                f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                f"global_batch_size {global_batch_size} (resume only at optimizer-step boundaries)")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.micro_batches_per_step = global_batch_size // (micro_batch_size * dp_size)

    def positions_to_indices(self, positions: np.ndarray) -> np.ndarray:
        """Dataset indices at global positions of the shuffled order (any epochs)."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):  # a batch spans at most a couple of epochs
            mask = epochs == epoch
            perm = epoch_permutation(num_samples=self.num_samples, seed=self.seed, epoch=int(epoch))
            out[mask] = perm(positions[mask] % self.num_samples)
        return out

    def global_batch(self, step: int) -> np.ndarray:
        """All GB dataset indices of optimizer step `step`, in rank-then-micro-batch order."""
        start = step * self.global_batch_size
        return self.positions_to_indices(np.arange(start, start + self.global_batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: micro-batches of this rank, step after step, from consumed_samples on."""
        per_rank = self.global_batch_size // self.dp_size
        step = self.consumed_samples // self.global_batch_size
        while True:
            base = step * self.global_batch_size + self.dp_rank * per_rank
            indices = self.positions_to_indices(np.arange(base, base + per_rank))
            for m in range(self.micro_batches_per_step):
                yield indices[m * self.micro_batch_size:(m + 1) * self.micro_batch_size].tolist()
            step += 1
