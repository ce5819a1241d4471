"""Run configs for the launch tests (kept apart from tests/training/conftest.py so both can be imported)."""

import dataclasses
import os
import shutil
import sys
from pathlib import Path

from megamobi.config_io import from_dict
from megamobi.training.run_config import RunConfig

MODEL = {"name": "launch-tiny", "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 48, "max_seq_len": 64}


def make_small_run(run_dir: Path, shards: Path, *, global_batch: int) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": str(run_dir), "model": MODEL, "data": {"paths": [str(shards)]},
        "batch": {"micro_batch_size": 2, "global_batch_size": global_batch, "seq_len": 32},
        "optimizer": {"warmup_steps": 1}, "train": {"steps": 3, "log_interval": 1}, "precision": "fp32",
    }, where="test")


def launch_env(**extra) -> dict[str, str]:
    """The environment of a launch as a user types it: no SLURM, MEGAMOBI_, NPROC or MASTER_ variables
    of ours leak in; the venv's `deepspeed` and python come first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               **extra)
    return env


def relative_run(tmp_path: Path, token_shards: Path, **train) -> Path:
    """A run config whose run_dir and data.paths are relative: they must resolve from the user's directory."""
    from run_yaml import write_run_yaml

    shutil.copytree(token_shards, tmp_path / "shards")
    run = make_small_run(tmp_path / "run", tmp_path / "shards", global_batch=8)
    run = dataclasses.replace(run, run_dir="run", data=dataclasses.replace(run.data, paths=["shards"]),
                              train=dataclasses.replace(run.train, **train))
    return write_run_yaml(tmp_path / "run.yaml", run)
