"""Blending without a per-sample index (megamobi/data/subsets.py, blend_index.py): the order equals the
per-sample index megamobi built before (bench/legacy_blend.py), so no existing blended run changes; the
proportions hold within sampling error over the shuffled order; the inverse (--find) finds every
position of a sample; the per-block source table is built once, shared by processes starting together,
rebuilt when damaged, and skipped (built in memory) where the shard directory cannot hold it. Shards
are sparse Amber-like sets (bench/synthetic_shards.py): Amber's seven sources mixed in every shard."""

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest

from megamobi.data import build_datasets
from megamobi.data.blend_index import CACHE_DIR
from megamobi.data.sampler import epoch_permutation
from megamobi.data.shard_dataset import ShardedDataset
from megamobi.data.subsets import MAX_SPLIT_BLOCKS, BlendedDataset, split_train_val

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from legacy_blend import legacy_blend_index
from synthetic_shards import AMBER_TOKENS_B, SAMPLE_TOKENS, write_sparse_shards

CASES = [  # (val_fraction, weights): Amber's own mix; upsampling small sources; zero and missing weights
    (0.0, AMBER_TOKENS_B),
    (0.1, {"arxiv": 5.0, "wikipedia": 5.0, "c4": 1.0}),
    (0.05, {"book": 0.0, "stackexchange": 3.0, "refinedweb": 1.0, "starcoder": 1.0}),
]


@pytest.fixture(scope="module")
def amber(tmp_path_factory):
    return write_sparse_shards(tmp_path_factory.mktemp("amber") / "shards", tokens=SAMPLE_TOKENS * 30_011, shards=7)


@pytest.mark.parametrize("val_fraction,weights", CASES)
def test_order_and_inverse_equal_the_per_sample_index(amber, val_fraction, weights):
    train, _ = split_train_val(ShardedDataset([amber]), val_fraction=val_fraction, seed=3)
    blend = BlendedDataset(train, weights=weights)
    reference = legacy_blend_index(train.sample_sources(), train.sources, weights)
    assert len(blend) == len(reference) == len(train)
    assert np.array_equal(blend.sample_sources(), train.sample_sources()[reference])  # every position's source
    rng = np.random.default_rng(0)
    positions = np.concatenate([np.arange(2000), rng.choice(len(blend), 3000, replace=False)])
    assert np.array_equal(blend.subset_indices(positions), reference[positions])  # and sample
    for sample in rng.choice(len(train), 40, replace=False).tolist() + [0, len(train) - 1]:
        assert blend.positions_of(sample) == np.flatnonzero(reference == sample).tolist(), sample
    picked = int(reference[12345])
    assert np.array_equal(blend[12345], train[picked])


def test_proportions_within_sampling_error(amber):
    weights = {"arxiv": 1.0, "c4": 2.0, "starcoder": 3.0, "wikipedia": 4.0}
    train, _ = build_datasets([amber], source_weights=weights, val_fraction=0.0)
    total = sum(weights.values())
    assert {n: c / len(train) for n, c in train.realised_counts.items()} == pytest.approx(
        {n: w / total for n, w in weights.items()}, abs=1 / len(train))
    # A training window of 4000 positions of the shuffled order draws each source binomially.
    perm = epoch_permutation(num_samples=len(train), seed=1234, epoch=0)
    picks = perm(np.arange(5000, 9000))
    sources = np.array(train.sources)[train.sources_at(picks)]
    for name, w in weights.items():
        share, n = w / total, len(picks)
        assert abs((sources == name).sum() - share * n) <= 4 * np.sqrt(n * share * (1 - share)), name
    assert set(sources) == set(weights)


def _open(path, weights, queue):
    train, _ = build_datasets([path], source_weights=weights, val_fraction=0.0)
    queue.put(train.subset_indices(np.arange(0, len(train), 997)).tolist())


def test_the_source_table_is_built_once_and_shared(tmp_path):
    shards = write_sparse_shards(tmp_path / "shards", tokens=SAMPLE_TOKENS * 5000, shards=5)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_open, args=(shards, AMBER_TOKENS_B, queue)) for _ in range(4)]
    for p in procs:  # four ranks starting at once: one builds under the lock, the others map its file
        p.start()
    answers = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert all(a == answers[0] for a in answers)
    cache = shards / CACHE_DIR
    [table] = cache.glob("source_blocks-*.npy")
    assert sorted(p.name for p in cache.iterdir()) == ["lock", table.name]  # no temporary left
    assert np.load(table).sum() == 5000
    # Damaged, and a builder killed mid-write left its temporary: rebuilt in place, same order, no leftover.
    table.write_bytes(table.read_bytes()[:100])
    (cache / f"{table.name}.999.tmp").write_bytes(b"torn")
    train, _ = build_datasets([shards], source_weights=AMBER_TOKENS_B, val_fraction=0.0)
    assert train.subset_indices(np.arange(0, len(train), 997)).tolist() == answers[0]
    assert np.load(table).sum() == 5000
    assert sorted(p.name for p in cache.iterdir()) == ["lock", table.name]
    # The cache folder cannot be made (a file in its place): the table is built in memory, same order.
    other = write_sparse_shards(tmp_path / "other", tokens=SAMPLE_TOKENS * 5000, shards=5)
    (other / CACHE_DIR).write_text("not a folder")
    train, _ = build_datasets([other], source_weights=AMBER_TOKENS_B, val_fraction=0.0)
    assert train.subset_indices(np.arange(0, len(train), 997)).tolist() == answers[0]
    assert (other / CACHE_DIR).read_text() == "not a folder"


def test_nothing_per_sample_is_held(tmp_path):
    shards = write_sparse_shards(tmp_path / "big", tokens=SAMPLE_TOKENS * 3 * MAX_SPLIT_BLOCKS, shards=3)
    train, _ = build_datasets([shards], source_weights=AMBER_TOKENS_B, val_fraction=0.01)
    assert len(train) > 2.9 * MAX_SPLIT_BLOCKS
    held = sum(a.nbytes for a in vars(train._ranks).values() if isinstance(a, np.ndarray))
    assert held <= (MAX_SPLIT_BLOCKS + 1) * 7 * 8  # one int64 per block and source, blocks of 3 samples
    assert all(a.nbytes < 1024 for a in vars(train).values() if isinstance(a, np.ndarray))


def test_preprocess_overwrite_removes_the_table(tmp_path):
    from synthetic_shards import write_synthetic_shards

    shards = write_synthetic_shards(tmp_path / "shards", samples=4, vocab_size=100)
    build_datasets([shards], source_weights={"synthetic": 1.0})
    assert list((shards / CACHE_DIR).glob("source_blocks-*.npy"))
    write_synthetic_shards(shards, samples=5, vocab_size=100)  # preprocess --overwrite
    assert not (shards / CACHE_DIR).exists()
    train, _ = build_datasets([shards], source_weights={"synthetic": 1.0})
    assert len(train) == 5
