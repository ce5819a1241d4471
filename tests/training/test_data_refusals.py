"""Refusing what would silently spoil a run, through the real CLI: token ids beyond the model's
vocabulary (before any process starts, and the loader's own guard), and a resume onto other data
than the checkpoint was trained on (unless data.allow_change, which is then recorded)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import make_run, read_metrics

from megamobi.checkpointing.manifest import read_manifest
from megamobi.config_io import ConfigError
from megamobi.data.preprocess import PreprocessOptions, preprocess
from megamobi.data.replay import RunReplay
from megamobi.training.loop import Trainer


def _pretrain(repo_root, config, *args, env=None):
    return subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--config", str(config), *args], cwd=repo_root,
                          capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1", **(env or {})})


@pytest.fixture(scope="module")
def wide_shards(tmp_path_factory):
    """Shards of a 1000-token vocabulary: every sample holds ids above the test model's 512."""
    root = tmp_path_factory.mktemp("wide")
    rng = np.random.default_rng(1)
    with open(root / "in.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"token_ids": rng.integers(0, 1000, 2049).tolist(), "source": "web"}) + "\n")
    preprocess(PreprocessOptions(inputs=[str(root / "in.jsonl")], output=str(root / "shards"), vocab_size=1000,
                                 progress=False))
    return root / "shards"


def test_out_of_vocabulary_ids_are_refused_before_any_process(tmp_path, wide_shards, repo_root):
    manifest = json.loads((wide_shards / "manifest.json").read_text())
    largest = manifest["max_token_id"]
    assert 512 <= largest < 1000
    config = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", wide_shards))
    for args in (["--check-only"], []):  # --check-only, and the start of a real run
        proc = _pretrain(repo_root, config, *args)
        assert proc.returncode == 2, proc.stderr
        assert f"{wide_shards}: token ids up to {largest} do not fit the model's vocab_size 512" in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_old_manifests_without_max_token_id_are_scanned(tmp_path, wide_shards, repo_root):
    """A manifest from before max_token_id whose vocabulary exceeds the model's: the shards are scanned."""
    from megamobi.data.token_ids import max_token_id

    shards = tmp_path / "old"
    shutil.copytree(wide_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    largest = manifest.pop("max_token_id")
    (shards / "manifest.json").write_text(json.dumps(manifest))
    assert max_token_id(shards, model_vocab_size=512) == largest  # scanned, not taken from vocab_size 1000
    config = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", shards))
    proc = _pretrain(repo_root, config, "--check-only")
    assert proc.returncode == 2 and f"token ids up to {largest} do not fit the model's vocab_size 512" in proc.stderr


def test_the_loader_guards_batches_when_a_manifest_understates_its_ids(tmp_path, wide_shards, repo_root):
    """An old manifest (no max_token_id) claiming a 512-token vocabulary passes the start checks; the
    loader's guard stops step 1 with the message instead of the embedding's IndexError."""
    shards = tmp_path / "old"
    shutil.copytree(wide_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["max_token_id"]
    manifest["vocab_size"] = 512
    (shards / "manifest.json").write_text(json.dumps(manifest))
    config = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", shards, batch={
        "micro_batch_size": 2, "global_batch_size": 2, "seq_len": 32}))
    assert _pretrain(repo_root, config, "--check-only").returncode == 0
    proc = _pretrain(repo_root, config, env={"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                             "MASTER_PORT": str(free_port())})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "does not fit the model's vocab_size 512" in proc.stderr and "training windows" in proc.stderr
    assert "Traceback" not in proc.stderr and "IndexError" not in proc.stderr


def _copy_with_other_content(source, target):
    """The same samples preprocessed again with a different shard size: another manifest."""
    preprocess(PreprocessOptions(inputs=[str(source.parent / "train_000.jsonl")], output=str(target), vocab_size=512,
                                 samples_per_shard=16, progress=False))


def test_resume_onto_changed_data_stops_unless_allowed_and_recorded(tmp_path, token_shards, repo_root):
    base = dict(train={"steps": 2, "seed": 11, "log_interval": 1},
                data={"paths": [str(token_shards)], "seed": 7, "val_fraction": 0.1})
    run = make_run(tmp_path / "r", token_shards, **base)
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    config = write_run_yaml(tmp_path / "run.yaml", run)

    proc = _pretrain(repo_root, config, "--check-only", "data.val_fraction=0.2", "data.seed=8", "batch.seq_len=16",
                     "data.source_weights={c4: 1.0}")
    assert proc.returncode == 2, proc.stderr
    for change in ("data.val_fraction: 0.1 -> 0.2", "data.seed: 7 -> 8", "batch.seq_len: 32 -> 16", "data.allow_change: true",
                   "data.source_weights: None -> {'c4': 1.0}", "step_0000002"):
        assert change in proc.stderr, change
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    rebuilt = tmp_path / "rebuilt"
    _copy_with_other_content(token_shards, rebuilt)
    proc = _pretrain(repo_root, config, f"data.paths=[{rebuilt}]")  # a real start, not only --check-only
    assert proc.returncode == 2 and f"data.paths: ['{token_shards}'] -> ['{rebuilt}']" in proc.stderr, proc.stderr
    assert _pretrain(repo_root, config, "--check-only", "data.val_fraction=0.2", "data.allow_change=true").returncode == 0
    for bad in ("maybe", "1"):
        proc = _pretrain(repo_root, config, "--check-only", f"data.allow_change={bad}")
        assert proc.returncode == 2 and "data.allow_change: expected true or false" in proc.stderr, proc.stderr

    # The trainer itself refuses too (it is what every rank runs), and with allow_change records the change.
    changed = make_run(tmp_path / "r", token_shards, train={"steps": 4, "seed": 11, "log_interval": 1},
                       data={**base["data"], "val_fraction": 0.2})
    allowed = make_run(tmp_path / "r", token_shards, train={"steps": 4, "seed": 11, "log_interval": 1},
                       data={**base["data"], "val_fraction": 0.2, "allow_change": True},
                       optimizer={"allow_schedule_change": True})  # 2 -> 4 steps: another cosine schedule

    def job(rank):
        try:
            Trainer(changed)
        except ConfigError as err:
            message = str(err)
        Trainer(allowed).train()
        return message

    [message] = run_ranks(job, world_size=1)
    assert "data.val_fraction: 0.1 -> 0.2" in message
    [record] = [m for m in read_metrics(tmp_path / "r") if "data_change" in m]
    assert record == {"step": 2, "data_change": ["data.val_fraction: 0.1 -> 0.2"], "data_allow_change": True}
    segments = read_manifest(tmp_path / "r" / "checkpoints" / "step_0000004")["data_provenance"]
    assert [(s["first_step"], s["last_step"], s["data"]["val_fraction"], s["data_changed"]) for s in segments] == [
        (1, 2, 0.1, []), (3, 4, 0.2, ["data.val_fraction: 0.1 -> 0.2"])]
    replay = RunReplay(tmp_path / "r")  # each segment replayed with its own split
    assert len(list(replay.sequences(1, 4))) == 4 * 8
