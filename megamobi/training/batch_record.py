"""Test hook: with MEGAMOBI_RECORD_BATCHES=DIR set, every training micro-batch a rank consumes is
appended to DIR/pid<PID>.jsonl (step, data stage, data-parallel rank, micro-batch, the training windows
drawn by the sampler, their shard sample and offset, and a hash of the exact tokens fed to the model), so
tests can hold megamobi.replay to what the loader really did. Unset (always, outside tests): no cost.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

ENV = "MEGAMOBI_RECORD_BATCHES"


def tokens_hash(tokens) -> str:
    """The hash tests compare: sha256 of the window's token ids as int64."""
    return hashlib.sha256(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()[:24]


def _base_index(dataset, index: int) -> int:
    """A training-view index -> its sample in the shard dataset, through the views as built."""
    from megamobi.data.subsets import BlendedDataset, BlockSubset

    while True:
        if isinstance(dataset, BlendedDataset):
            index, dataset = int(dataset.subset_indices([index])[0]), dataset.base
        elif isinstance(dataset, BlockSubset):
            index, dataset = dataset.base_index(index), dataset.base
        else:
            return index


def batch_recorder(windows, *, step: int, stage: int, dp_rank: int):
    """record(micro_batch, indices, samples) for one step's micro-batches of this rank, or None (hook off).
    `windows` is the stage's training view (training.data_stream.Windows)."""
    directory = os.environ.get(ENV)
    if not directory:
        return None
    path = Path(directory) / f"pid{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def record(micro_batch: int, indices: list[int], samples: list[np.ndarray]) -> None:
        origins = [divmod(i, windows.per_sample) for i in indices]
        line = {"step": step, "stage": stage, "rank": dp_rank, "micro_batch": micro_batch, "windows": list(indices),
                "sample_index": [_base_index(windows.dataset, s) for s, _ in origins],
                "offset": [w * windows.seq_len for _, w in origins],
                "hash": [tokens_hash(s) for s in samples]}
        with open(path, "a") as stream:  # one write per line: a killed run leaves at most one torn line
            stream.write(json.dumps(line) + "\n")

    return record
