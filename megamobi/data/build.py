"""build_datasets: the one call the training loop makes to get its data."""
from pathlib import Path

from .shard_dataset import ShardedDataset
from .subsets import BlendedDataset, split_train_val


def build_datasets(paths: list[str | Path], *, source_weights: dict[str, float] | None = None,
                   val_fraction: float = 0.0, seed: int = 1234, verify_checksums: bool = False):
    """(train, validation) map-style datasets over shard directories. The validation split is
    taken first (by seed, disjoint from train, natural source mix); blending then re-weights the
    training part only. ds[i] -> uint16 array of SEQ_LEN tokens; ds.sources -> source names."""
    base = ShardedDataset(paths, verify_checksums=verify_checksums)
    train, val = split_train_val(base, val_fraction=val_fraction, seed=seed)
    if source_weights is not None:
        train = BlendedDataset(train, weights=source_weights)
    return train, val
