"""Loader: memory maps, global-batch sampler semantics, splits, blending, corrupted shards."""
import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import SEQ_LEN, amber_rows, shard_file, write_amber

from megamobi.data import DataConfigError, GlobalBatchSampler, ShardError, build_datasets, collate, eval_batches
from megamobi.data.preprocess import PreprocessOptions, preprocess


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    sources = ["c4"] * 6 + ["arxiv"] * 3 + ["book"]  # 60% / 30% / 10%
    rows = amber_rows(100, sources=sources)
    path = write_amber(tmp / "a.jsonl", rows)
    preprocess(PreprocessOptions(inputs=[str(path)], output=str(tmp / "out"), samples_per_shard=16,
                                 progress=False))
    return tmp / "out", rows


def _steps(sampler: GlobalBatchSampler, steps: int) -> list[list[int]]:
    """Per optimizer step, the concatenated micro-batches this rank sees."""
    it, out = iter(sampler), []
    for _ in range(steps):
        out.append([i for _ in range(sampler.micro_batches_per_step) for i in next(it)])
    return out


def test_dataset_and_collate(shard_dir):
    directory, rows = shard_dir
    train, val = build_datasets([directory])
    assert len(train) == 100 and len(val) == 0 and train.sources == ["c4", "arxiv", "book"]
    assert train[17].tolist() == rows[17]["token_ids"] and train[17].dtype == np.uint16
    batch = collate([train[3], train[4]])
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, SEQ_LEN - 1)
    assert batch["labels"][0].tolist() == rows[3]["token_ids"][1:]
    assert batch["input_ids"][1].tolist() == rows[4]["token_ids"][:-1]


def test_global_order_independent_of_dp_and_micro_batch():
    n, gb = 1000, 24
    reference = GlobalBatchSampler(num_samples=n, global_batch_size=gb, micro_batch_size=gb,
                                   dp_rank=0, dp_size=1, seed=7)
    ref_steps = _steps(reference, 60)  # 1440 samples: crosses into epoch 2
    for dp, mb in [(1, 4), (2, 3), (4, 2), (3, 8)]:
        per_rank = [_steps(GlobalBatchSampler(num_samples=n, global_batch_size=gb, micro_batch_size=mb,
                                              dp_rank=r, dp_size=dp, seed=7), 60) for r in range(dp)]
        for step in range(60):
            merged = [i for r in range(dp) for i in per_rank[r][step]]
            assert merged == ref_steps[step]
            assert len(set(per_rank[0][step]) & set(per_rank[-1][step])) == 0 or dp == 1
    flat = [i for s in ref_steps for i in s]
    assert sorted(flat[:n]) == list(range(n))  # epoch 1 is a permutation
    assert sorted(flat[n:n + 440]) != list(range(440)) and len(set(flat[n:])) == 440
    assert flat[:n] != flat[n:2 * n]  # a fresh permutation each epoch
    other_seed = _steps(GlobalBatchSampler(num_samples=n, global_batch_size=gb, micro_batch_size=gb,
                                           dp_rank=0, dp_size=1, seed=8), 1)
    assert other_seed[0] != ref_steps[0]


def test_resume_continues_exactly():
    kwargs = dict(num_samples=777, global_batch_size=16, micro_batch_size=4, dp_size=2, seed=3)
    for rank in range(2):
        full = _steps(GlobalBatchSampler(dp_rank=rank, consumed_samples=0, **kwargs), 100)
        resumed = _steps(GlobalBatchSampler(dp_rank=rank, consumed_samples=16 * 60, **kwargs), 40)
        assert resumed == full[60:]


@pytest.mark.parametrize("bad, match", [
    (dict(global_batch_size=10, micro_batch_size=4), "divisible"),
    (dict(dp_rank=2), "dp_rank"),
    (dict(consumed_samples=5), "multiple of global_batch_size"),
    (dict(num_samples=0), "num_samples"),
])
def test_sampler_validation(bad, match):
    kwargs = dict(num_samples=10, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=2, seed=1)
    kwargs.update(bad)
    with pytest.raises(DataConfigError, match=match):
        GlobalBatchSampler(**kwargs)


def test_val_split_disjoint_and_deterministic(shard_dir):
    directory, rows = shard_dir
    train, val = build_datasets([directory], val_fraction=0.1, seed=5)
    assert len(val) == 10 and len(train) == 90
    t_idx = set(train.base_indices().tolist())
    v_idx = [val.base_index(i) for i in range(len(val))]
    assert not t_idx & set(v_idx) and t_idx | set(v_idx) == set(range(100))
    assert val[0].tolist() == rows[v_idx[0]]["token_ids"]
    _, val_again = build_datasets([directory], val_fraction=0.1, seed=5)
    _, val_other = build_datasets([directory], val_fraction=0.1, seed=6)
    assert [val_again.base_index(i) for i in range(10)] == v_idx
    assert [val_other.base_index(i) for i in range(10)] != v_idx
    ranks = [list(eval_batches(val, micro_batch_size=2, dp_rank=r, dp_size=3)) for r in range(3)]
    assert [len(b) for b in ranks] == [2, 2, 2]  # 9 samples / 3 ranks, micro-batches 2 + 1
    assert ranks[1][0]["labels"][0].tolist() == rows[v_idx[3]]["token_ids"][1:]
    assert len(list(eval_batches(val, micro_batch_size=4, dp_rank=0, dp_size=1, max_samples=5))) == 2


def test_blending_proportions(shard_dir):
    directory, _ = shard_dir
    train, _ = build_datasets([directory], source_weights={"c4": 0.2, "arxiv": 0.3, "book": 0.5})
    assert len(train) == 100
    sources = np.array(train.sources)[train.sample_sources()]
    assert {s: int((sources == s).sum()) for s in train.sources} == {"c4": 20, "arxiv": 30, "book": 50}
    prefix = sources[:20]  # interleaved: every prefix is close to the mix
    assert abs((prefix == "book").sum() - 10) <= 1
    only_c4, _ = build_datasets([directory], source_weights={"c4": 1.0})
    assert set(np.array(only_c4.sources)[only_c4.sample_sources()]) == {"c4"}
    with pytest.raises(DataConfigError, match="unknown sources"):
        build_datasets([directory], source_weights={"wiki": 1.0})


def _copy(directory, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(directory, target)
    return target


def test_corrupted_shards_refused(shard_dir, tmp_path):
    directory, _ = shard_dir
    d = _copy(directory, tmp_path)
    damaged = shard_file(d, 2, "bin")
    with open(damaged, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ShardError, match=rf"{damaged.name}: 1000 bytes.*re-run"):
        build_datasets([d])
    shutil.rmtree(d)
    d = _copy(directory, tmp_path)
    raw = bytearray(shard_file(d, 1, "idx").read_bytes())
    raw[17] = 4  # dtype code int32
    shard_file(d, 1, "idx").write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="dtype code 4"):
        build_datasets([d])
    shutil.rmtree(d)
    d = _copy(directory, tmp_path)
    raw = bytearray(shard_file(d, 0, "bin").read_bytes())
    raw[5] ^= 0xFF
    shard_file(d, 0, "bin").write_bytes(bytes(raw))
    build_datasets([d])  # sizes and headers fine: opens by default
    with pytest.raises(ShardError, match="sha256"):
        build_datasets([d], verify_checksums=True)
    (d / "manifest.json").unlink()
    with pytest.raises(ShardError, match="manifest.json: missing"):
        build_datasets([d])


def test_1000_shards_open_as_one_index(shard_dir, tmp_path):
    """Opening reads headers only (bench/bench_data.py prints the start-up time)."""
    directory, _ = shard_dir
    manifest = json.loads((directory / "manifest.json").read_text())
    record = manifest["shards"][0]
    big = tmp_path / "big"
    big.mkdir()
    shards = []
    for k in range(1000):
        files = {}
        for key, info in record["files"].items():
            name = info["file"].replace("shard_00000", f"shard_{k:05d}")
            (big / name).hardlink_to(directory / info["file"])
            files[key] = {**info, "file": name}
        shards.append({**record, "name": f"shard_{k:05d}", "files": files})
    manifest["shards"] = shards
    (big / "manifest.json").write_text(json.dumps(manifest))
    train, _ = build_datasets([big])
    assert len(train) == 16000
    assert train[16 * 999 + 3].tolist() == train[3].tolist()
