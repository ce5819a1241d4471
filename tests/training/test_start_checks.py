"""What a run loads is checked before it starts: the model a checkpoint holds (checkpoint.init_from,
a run_dir's own checkpoints), `model: from_checkpoint`, the resumed position against the global
batch, and checkpoint.keep_last pruning that can never delete `latest` or the resumed checkpoint."""

import dataclasses
import os
import subprocess
import sys

import torch
from multiproc import run_ranks
from run_yaml import write_run_yaml
from training_runs import MODEL, make_run, read_metrics

from megamobi.checkpointing.manifest import write_manifest
from megamobi.checkpointing.model_files import write_full_model
from megamobi.config_io import ConfigError, from_dict
from megamobi.model import MobiLlama
from megamobi.model_config import ModelConfig
from megamobi.training.checkpoint import prune_checkpoints
from megamobi.training.loop import Trainer
from megamobi.training.run_config import load_run_config


def weights_checkpoint(path, *, consumed_samples=0, **model_changes):
    """A weights-only checkpoint (what `convert from-hf` writes) of the test model with `model_changes`."""
    config = from_dict(ModelConfig, {**MODEL, **model_changes}, where="test")
    torch.manual_seed(0)
    path.mkdir(parents=True)
    write_full_model(path, MobiLlama(config).state_dict())
    write_manifest(path, model_config=config, info={"step": 0, "consumed_samples": consumed_samples, "consumed_tokens": 0})
    return path


def check_only(path, *overrides, repo_root):
    return subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(path), *overrides],
                          cwd=repo_root, capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "1"})


def test_init_from_another_model_is_refused_naming_the_fields(tmp_path, token_shards, repo_root):
    other = weights_checkpoint(tmp_path / "per-layer", ffn_sharing="per_layer", vocab_size=600)
    path = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards, checkpoint={"init_from": str(other)}))
    proc = check_only(path, repo_root=repo_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "checkpoint.init_from" in proc.stderr and "ffn_sharing per_layer (checkpoint) vs shared (run)" in proc.stderr
    assert "vocab_size 600 (checkpoint) vs 512 (run)" in proc.stderr
    proc = check_only(path, "checkpoint.init_from=" + str(tmp_path / "missing"), repo_root=repo_root)
    assert proc.returncode == 2 and f"checkpoint.init_from: {tmp_path / 'missing'} does not exist" in proc.stderr


def test_model_from_checkpoint_trains_the_checkpoints_model(tmp_path, token_shards, repo_root):
    start = weights_checkpoint(tmp_path / "imported", ffn_sharing="per_layer", name="imported")
    run = make_run(tmp_path / "r", token_shards, checkpoint={"init_from": str(start)}, train={"steps": 2, "log_interval": 1})
    path = write_run_yaml(tmp_path / "run.yaml", run)
    proc = check_only(path, "model=from_checkpoint", repo_root=repo_root)
    assert proc.returncode == 0, proc.stderr
    loaded = load_run_config(path, ["model=from_checkpoint"])
    assert loaded.model_config.ffn_sharing == "per_layer" and loaded.model_config.name == "imported"
    run_ranks(lambda rank: Trainer(loaded).train() and None, world_size=1)
    assert read_metrics(tmp_path / "r")[0]["step"] == 1
    # Without a checkpoint to take it from, the run is refused with what to give.
    proc = check_only(path, "model=from_checkpoint", "checkpoint.init_from=null", "run_dir=" + str(tmp_path / "new"),
                      repo_root=repo_root)
    assert proc.returncode == 2 and "model: from_checkpoint needs checkpoint.init_from" in proc.stderr, proc.stderr


def test_run_dir_holding_another_model_is_refused_at_check_and_at_start(tmp_path, token_shards, repo_root):
    weights_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000002", hidden_size=64)
    run = make_run(tmp_path / "r", token_shards)
    proc = check_only(write_run_yaml(tmp_path / "run.yaml", run), repo_root=repo_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"run_dir {tmp_path / 'r'}" in proc.stderr and "hidden_size 64 (checkpoint) vs 32 (run)" in proc.stderr

    def start(rank):
        try:
            Trainer(run)
        except ConfigError as err:
            return str(err)

    [message] = run_ranks(start, world_size=1)
    assert "hidden_size 64 (checkpoint) vs 32 (run)" in message


def test_resumed_position_must_fit_the_global_batch(tmp_path, token_shards, repo_root):
    weights_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000002", consumed_samples=16)
    path = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards))
    proc = check_only(path, "batch.global_batch_size=12", repo_root=repo_root)
    assert proc.returncode == 2 and "batch.global_batch_size 12 does not divide the 16 samples consumed" in proc.stderr
    assert check_only(path, repo_root=repo_root).returncode == 0  # 8 divides 16


def test_pruning_never_deletes_latest_or_the_resumed_checkpoint(tmp_path, token_shards):
    """A 5-step attempt left checkpoints 2, 4, 5; 4 and 5 are damaged; the user shortens the run to
    3 steps with keep_last 1 (a cosine schedule change: allowed). It resumes from 2 and saves 3: pruning
    by age alone would delete 3 (which `latest` names) and 2 (what it resumed from), because the broken 4
    and 5 look newer. Pruning counts and deletes only checkpoints older than the newest healthy one (3),
    and never one it could not verify: the broken 4 and 5 stay for someone to look at."""
    first = make_run(tmp_path / "r", token_shards, train={"steps": 5, "log_interval": 1},
                     checkpoint={"interval_tokens": 2 * 8 * 32})
    run_ranks(lambda rank: Trainer(first).train() and None, world_size=1)
    root = tmp_path / "r" / "checkpoints"
    for name in ("step_0000004", "step_0000005"):
        victim = next((root / name / "model").glob("*.safetensors"))
        victim.write_bytes(victim.read_bytes()[:-1] + b"!")
    second = dataclasses.replace(first, train=dataclasses.replace(first.train, steps=3),
                                 checkpoint=dataclasses.replace(first.checkpoint, keep_last=1),
                                 optimizer=dataclasses.replace(first.optimizer, allow_schedule_change=True))
    run_ranks(lambda rank: Trainer(second).train() and None, world_size=1)
    assert (root / "latest").read_text() == "step_0000003\n"
    assert (root / "step_0000003" / "megamobi.json").is_file() and (root / "step_0000002" / "megamobi.json").is_file()
    assert (root / "step_0000004").is_dir() and (root / "step_0000005").is_dir()  # newer than the newest healthy
    # Directly: whatever keep_last, the protected and the `latest` checkpoints stay.
    assert prune_checkpoints(tmp_path / "r", keep_last=1, protect=(root / "step_0000002",)) == []
