"""megamobi data pipeline: preprocessing into uint16 Megatron-format shards, and loading them.

Training-loop API:
    train_ds, val_ds = build_datasets(paths=[...], source_weights=None, val_fraction=0.0, seed=1234)
    sampler = GlobalBatchSampler(num_samples=len(train_ds), global_batch_size=GB,
                                 micro_batch_size=MB, dp_rank=r, dp_size=D, seed=seed,
                                 consumed_samples=c)
    for micro_batch_indices in sampler:
        batch = collate([train_ds[i] for i in micro_batch_indices])
"""
from .build import build_datasets
from .collate import collate, eval_batches
from .errors import BadInputError, DataConfigError, DataError, ShardError
from .indexed_format import SEQ_LEN
from .sampler import GlobalBatchSampler
from .shard_dataset import ShardedDataset
from .subsets import BlendedDataset, BlockSubset

__all__ = [
    "SEQ_LEN",
    "BadInputError",
    "BlendedDataset",
    "BlockSubset",
    "DataConfigError",
    "DataError",
    "GlobalBatchSampler",
    "ShardError",
    "ShardedDataset",
    "build_datasets",
    "collate",
    "eval_batches",
]
