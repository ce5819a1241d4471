"""Training and validation batches for this rank, from the shard datasets.

Shard samples are 2049 tokens. A run with batch.seq_len = L < 2048 cuts each sample into
2048 / L windows of L + 1 tokens that overlap by one token (2049 = k * L + 1, so nothing is
wasted); with L = 2048 a window is the sample itself. The sampler then shuffles windows, so
"consumed samples" in a run always counts training sequences of seq_len tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megamobi.data import GlobalBatchSampler, build_datasets, collate, eval_batches
from megamobi.data.token_ids import check_batch_ids, check_token_ids
from megamobi.training.batch_record import batch_recorder
from megamobi.training.run_config import SAMPLE_TOKENS, RunConfig


class Windows:
    """Map-style view of `dataset` as windows of seq_len + 1 tokens."""

    def __init__(self, dataset, seq_len: int):
        self.dataset = dataset
        self.seq_len = seq_len
        self.per_sample = (SAMPLE_TOKENS - 1) // seq_len

    def __len__(self) -> int:
        return len(self.dataset) * self.per_sample

    def __getitem__(self, index: int) -> np.ndarray:
        sample, window = divmod(index, self.per_sample)
        start = window * self.seq_len
        return self.dataset[sample][start:start + self.seq_len + 1]


class RunData:
    def __init__(self, run: RunConfig):
        train, val = build_datasets(run.data.paths, source_weights=run.data.source_weights,
                                    val_fraction=run.data.val_fraction, seed=run.data.seed)
        self.train = Windows(train, run.batch.seq_len)
        self.val = Windows(val, run.batch.seq_len) if val is not None and len(val) else None
        self.run = run
        self.vocab_size = run.model_config.vocab_size
        check_token_ids(run.data.paths, vocab_size=self.vocab_size)  # ids the embedding cannot hold: exit 2 now

    def manifest_checksums(self) -> dict[str, str]:
        """sha256 of each data directory's manifest.json: which data a checkpoint was trained on."""
        from megamobi.files import sha256_file

        return {path: sha256_file(Path(path) / "manifest.json") for path in self.run.data.paths}

    def train_batches(self, *, consumed_samples: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
        """Endless micro-batches for this data-parallel rank, continuing after `consumed_samples`; each
        also names its training windows (`windows`: what a skipped step did not train on)."""
        sampler = GlobalBatchSampler(num_samples=len(self.train), global_batch_size=self.run.batch.global_batch_size,
                                     micro_batch_size=self.run.batch.micro_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, seed=self.run.data.seed, consumed_samples=consumed_samples)
        record = batch_recorder(self, consumed_samples=consumed_samples, dp_rank=dp_rank, sampler=sampler)
        for indices in sampler:
            samples = [self.train[i] for i in indices]
            check_batch_ids(samples, vocab_size=self.vocab_size, where=f"training windows {indices}")
            if record is not None:
                record(indices, samples)
            yield {**collate(samples), "windows": list(indices)}

    def step_windows(self, *, position: int, dp_rank: int, dp_size: int) -> list[int]:
        """The training windows data-parallel rank `dp_rank` consumes in the step starting at global
        position `position` (what a `poison` fault marks as bad data)."""
        b = self.run.batch
        sampler = GlobalBatchSampler(num_samples=len(self.train), global_batch_size=b.global_batch_size,
                                     micro_batch_size=b.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                                     seed=self.run.data.seed, consumed_samples=position)
        batches = iter(sampler)
        return [i for _ in range(sampler.micro_batches_per_step) for i in next(batches)]

    def window_origins(self, windows: list[int]) -> list[dict]:
        """Where training windows come from: shard file, row, token offset."""
        from megamobi.training.batch_record import _base_index

        dataset = self.train.dataset
        while hasattr(dataset, "base"):
            dataset = dataset.base  # the ShardedDataset under the split / blend views
        origins = []
        for window in windows:
            sample, part = divmod(int(window), self.train.per_sample)
            shard, row = dataset.locate(_base_index(self.train.dataset, sample))
            origins.append({"shard": str(dataset.bin_paths[shard]), "row": int(row), "offset": part * self.train.seq_len})
        return origins

    def val_batches(self, *, dp_rank: int, dp_size: int) -> Iterator[dict]:
        if self.val is None:
            return iter(())
        return eval_batches(self.val, micro_batch_size=self.run.batch.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            max_samples=self.run.train.eval_samples)
