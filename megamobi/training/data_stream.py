"""Training and validation batches for this rank, from the shard datasets.

Shard samples are 2049 tokens. A run with batch.seq_len = L < 2048 cuts each sample into
2048 / L windows of L + 1 tokens that overlap by one token (2049 = k * L + 1, so nothing is
wasted); with L = 2048 a window is the sample itself. The sampler then shuffles windows, so
"consumed samples" in a run always counts training sequences of seq_len tokens.

With data.stages, every stage has its own datasets (build_datasets with the stage's paths, blend, split
and seed) and its own shuffled order, which starts at position 0 on the stage's first step.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from megamobi.data import DataConfigError, GlobalBatchSampler, build_datasets, collate, eval_batches
from megamobi.data.fingerprints import fingerprints_record
from megamobi.data.stages import STAGE_ZERO, DataStage, StageCursor, StagePosition, all_paths
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


class StageData:
    """One data stage's training and validation windows."""

    def __init__(self, stage: DataStage, *, seq_len: int) -> None:
        try:
            train, val = build_datasets(stage.paths, source_weights=stage.source_weights,
                                        val_fraction=stage.val_fraction, seed=stage.seed)
        except DataConfigError as err:
            raise DataConfigError(f"{stage.key}: {err}" if stage.staged else str(err)) from None
        self.stage = stage
        self.train = Windows(train, seq_len)
        self.val = Windows(val, seq_len) if val is not None and len(val) else None


class RunData:
    """Every data stage's datasets (one stage without data.stages), opened and checked at start; the
    batches of one step come from the stage that step trains on (megamobi/data/stages.py)."""

    def __init__(self, run: RunConfig):
        self.run = run
        self.stages = [StageData(stage, seq_len=run.batch.seq_len) for stage in run.data_stages]
        self.current = self.stages[0]  # the stage of the latest step's batches: what validation evaluates
        self.vocab_size = run.model_config.vocab_size
        # ids the embedding cannot hold: exit 2 now
        check_token_ids(all_paths(run.data_stages), vocab_size=self.vocab_size)
        # Size and sampled blocks of every shard file, as opened now: what every checkpoint of this start
        # records and a resume compares (megamobi/data/fingerprints.py).
        self.fingerprints = fingerprints_record(all_paths(run.data_stages))

    @property
    def train(self) -> Windows:
        return self.current.train

    @property
    def val(self) -> Windows | None:
        return self.current.val

    def manifest_checksums(self) -> dict[str, str]:
        """sha256 of each data directory's manifest.json: which data a checkpoint was trained on."""
        from megamobi.training.stage_checks import manifest_checksums

        return manifest_checksums(all_paths(self.run.data_stages))

    def step_batches(self, where: StagePosition, *, dp_rank: int, dp_size: int) -> Iterator[dict]:
        """This data-parallel rank's micro-batches of one step: the step's slice of its stage's order; each
        also names its training windows (`windows`: what a skipped step did not train on). From now on
        validation evaluates that stage's split."""
        self.current = part = self.stages[where.stage.index]
        sampler = GlobalBatchSampler(num_samples=len(part.train), global_batch_size=self.run.batch.global_batch_size,
                                     micro_batch_size=self.run.batch.micro_batch_size, dp_rank=dp_rank,
                                     dp_size=dp_size, seed=where.stage.shuffle_seed, consumed_samples=where.position)
        record = batch_recorder(part.train, step=where.step, stage=where.stage.index, dp_rank=dp_rank)

        def micro_batches() -> Iterator[dict]:
            for micro_batch, indices in zip(range(sampler.micro_batches_per_step), sampler):
                samples = [part.train[i] for i in indices]
                check_batch_ids(samples, vocab_size=self.vocab_size, where=f"training windows {indices}")
                if record is not None:
                    record(micro_batch, indices, samples)
                yield {**collate(samples), "windows": list(indices)}

        return micro_batches()

    def train_batches(self, *, consumed_samples: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
        """Endless micro-batches of a run without data.stages, continuing after `consumed_samples` (the
        trainer asks step by step, step_batches, so that stages can change)."""
        if len(self.stages) > 1:
            raise ValueError("train_batches() reads one data config; a run with data.stages needs step_batches()")
        gb, seq_len = self.run.batch.global_batch_size, self.run.batch.seq_len
        cursor = StageCursor(self.run.data_stages[:1], resumed=STAGE_ZERO)
        step = consumed_samples // gb
        while True:
            step += 1
            where = cursor.step(step=step, consumed_samples=(step - 1) * gb, consumed_tokens=(step - 1) * gb * seq_len)
            yield from self.step_batches(where, dp_rank=dp_rank, dp_size=dp_size)

    def window_origins(self, stage: int, windows: list[int]) -> list[dict]:
        """Where training windows of data stage `stage` come from: shard file, row, token offset."""
        from megamobi.training.batch_record import _base_index

        view = self.stages[stage].train
        dataset = view.dataset
        while hasattr(dataset, "base"):
            dataset = dataset.base  # the ShardedDataset under the split / blend views
        origins = []
        for window in windows:
            sample, part = divmod(int(window), view.per_sample)
            shard, row = dataset.locate(_base_index(view.dataset, sample))
            origins.append({"shard": str(dataset.bin_paths[shard]), "row": int(row), "offset": part * view.seq_len})
        return origins

    def val_batches(self, *, dp_rank: int, dp_size: int) -> Iterator[dict]:
        if self.val is None:
            return iter(())
        return eval_batches(self.val, micro_batch_size=self.run.batch.micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                            max_samples=self.run.train.eval_samples)
