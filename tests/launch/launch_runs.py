"""Run configs for the launch tests (kept apart from tests/training/conftest.py so both can be imported)."""

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
