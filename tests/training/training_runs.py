"""Small real training runs for the tests: a run config of the test model, and its logs."""

import json
import time
from pathlib import Path

from megamobi.config_io import from_dict
from megamobi.training.run_config import RunConfig

VOCAB = 512  # matches the `token_shards` fixture
MODEL = {"name": "test-tiny", "vocab_size": VOCAB, "hidden_size": 32, "num_layers": 3, "num_attention_heads": 4,
         "intermediate_size": 48, "max_seq_len": 64, "ffn_sharing": "shared"}


def make_run(run_dir: Path, shards: Path, **sections) -> RunConfig:
    """A fp32 run of the test model: 6 steps of 8 sequences x 32 tokens; override any section."""
    data = {
        "run_dir": str(run_dir), "model": dict(MODEL),
        "data": {"paths": [str(shards)], "seed": 7},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32},
        "optimizer": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "clip_grad": 1.0},
        "train": {"steps": 6, "seed": 11, "log_interval": 1},
        "parallel": {"zero_stage": 1},
        "precision": "fp32",
        "checkpoint": {"interval_tokens": 0},
    }
    for section, values in sections.items():
        data[section] = {**data[section], **values} if isinstance(data.get(section), dict) else values
    run = from_dict(RunConfig, data, where="test")
    run.validate()
    return run


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir) if "loss" in m]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (bash -> megamobi.launcher -> the ranks), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_for(proc, condition, *, timeout: float = 240.0) -> None:
    """Poll `condition()` while the launched run `proc` is alive (its output on failure)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never reached the point to act at"
        time.sleep(0.01)


def latest_name(checkpoints: Path) -> str | None:
    """What `checkpoints/latest` names, or None."""
    latest = checkpoints / "latest"
    return latest.read_text().strip() if latest.is_file() else None
