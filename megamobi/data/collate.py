"""Turning samples into model batches. torch is imported here only, and lazily, so that the
preprocessing tools do not pay for it."""
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import DataConfigError


def collate(samples: Sequence[np.ndarray]) -> dict:
    """[MB] x SEQ_LEN uint16 -> {"input_ids": int64 [MB, SEQ_LEN-1], "labels": int64 [MB, SEQ_LEN-1]}."""
    import torch

    tokens = torch.from_numpy(np.stack(samples).astype(np.int64))
    return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def eval_batches(val_ds, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 max_samples: int | None = None) -> Iterator[dict]:
    """Validation samples 0..n-1 in order, n = min(len, max_samples) rounded down to a multiple of
    dp_size; rank r gets the contiguous slice [r*n/D, (r+1)*n/D) in micro-batches (the last may be
    smaller). Every rank yields the same number of batches, so collectives stay matched."""
    if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataConfigError(f"need micro_batch_size >= 1 and 0 <= dp_rank ({dp_rank}) < dp_size "
                              f"({dp_size}), got micro_batch_size {micro_batch_size}")
    n = len(val_ds) if max_samples is None else min(len(val_ds), max_samples)
    per_rank = n // dp_size
    start = dp_rank * per_rank
    for first in range(start, start + per_rank, micro_batch_size):
        last = min(first + micro_batch_size, start + per_rank)
        yield collate([val_ds[i] for i in range(first, last)])
