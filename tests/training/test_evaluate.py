"""`python -m megamobi.evaluate`: the loss of a checkpoint on shards, overall and per source, on
windows cut exactly as training cuts them, and on the run's own validation or training split."""

import json
import subprocess
import sys

import numpy as np
import torch
from multiproc import run_ranks
from training_runs import make_run

from megamobi.data import ShardedDataset, build_datasets
from megamobi.generate import load_model
from megamobi.model import language_model_loss
from megamobi.training.data_stream import RunData
from megamobi.training.loop import Trainer


def _evaluate(repo_root, checkpoint, *args):
    out = subprocess.run([sys.executable, "-m", "megamobi.evaluate", "--checkpoint", str(checkpoint), *map(str, args),
                          "--json"], cwd=repo_root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _loss(checkpoint, rows):
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
    with torch.no_grad():
        return language_model_loss(load_model(str(checkpoint))(tokens[:, :-1]), tokens[:, 1:]).item()


def test_evaluate_scores_every_training_window_and_the_runs_validation_split(tmp_path, token_shards, repo_root):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 2, "log_interval": 1},
                   data={"paths": [str(token_shards)], "seed": 7, "val_fraction": 0.25})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    checkpoint = tmp_path / "r" / "checkpoints" / "step_0000002"

    # --data: the first 3 samples, each cut into 2048 / 32 windows of 33 tokens as training does.
    result = _evaluate(repo_root, checkpoint, "--data", token_shards, "--samples", 3, "--batch", 16)
    assert result["seq_len"] == 32  # the run's batch.seq_len, recorded in the checkpoint (not 2048)
    assert result["windows"] == 3 * 64 and result["tokens"] == 3 * 2048
    dataset = ShardedDataset([token_shards])
    windows = [dataset[i][w * 32:w * 32 + 33] for i in range(3) for w in range(64)]
    assert abs(result["loss"] - _loss(checkpoint, windows)) < 1e-5
    weighted = sum(r["loss"] * r["tokens"] for r in result["per_source"].values()) / result["tokens"]
    assert abs(weighted - result["loss"]) < 1e-6

    # --split val: exactly the validation windows the run itself evaluates (RunData.val), none of training.
    result = _evaluate(repo_root, checkpoint, "--split", "val", "--samples", 1000, "--batch", 64)
    val_windows = RunData(run).val
    assert result["windows"] == len(val_windows) == result["samples"] * 64
    assert abs(result["loss"] - _loss(checkpoint, [val_windows[i] for i in range(len(val_windows))])) < 1e-5
    train, val = build_datasets([token_shards], val_fraction=0.25, seed=7)
    train_rows = {bytes(train[i]) for i in range(len(train))}
    assert not any(bytes(val[i]) in train_rows for i in range(len(val)))
    result = _evaluate(repo_root, checkpoint, "--split", "train", "--samples", 1000, "--seq-len", 64, "--batch", 128)
    assert result["samples"] == len(train) and result["samples"] + len(val) == len(dataset)
