"""`python -m megamobi.evaluate`: the loss of a checkpoint on shards, overall and per source."""

import json
import subprocess
import sys

import numpy as np
import torch
from multiproc import run_ranks
from training_runs import make_run

from megamobi.data import ShardedDataset
from megamobi.generate import load_model
from megamobi.model import language_model_loss
from megamobi.training.loop import Trainer


def test_evaluate_matches_the_training_loss(tmp_path, token_shards, repo_root):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 2, "log_interval": 1})
    run_ranks(lambda rank: Trainer(run).train() and None, world_size=1)
    checkpoint = tmp_path / "r" / "checkpoints" / "step_0000002"
    out = subprocess.run([sys.executable, "-m", "megamobi.evaluate", "--checkpoint", str(checkpoint), "--data",
                          str(token_shards), "--samples", "6", "--seq-len", "32", "--batch", "4", "--json"],
                         cwd=repo_root, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)

    dataset = ShardedDataset([token_shards])
    tokens = torch.from_numpy(np.stack([dataset[i][:33] for i in range(6)]).astype(np.int64))
    with torch.no_grad():
        expected = language_model_loss(load_model(str(checkpoint))(tokens[:, :-1]), tokens[:, 1:]).item()
    assert abs(result["loss"] - expected) < 1e-5
    assert set(result["per_source"]) == {"c4", "arxiv"}
    weighted = sum(r["loss"] * r["tokens"] for r in result["per_source"].values()) / (6 * 32)
    assert abs(weighted - result["loss"]) < 1e-6
