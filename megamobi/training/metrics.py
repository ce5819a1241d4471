"""One clear line per logging step on rank 0, the same values in RUN_DIR/metrics.jsonl, and
optionally wandb (offline unless configured) and TensorBoard."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from megamobi.training.run_config import LoggingConfig


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def memory_gb() -> float:
    """This rank's peak memory in GiB: the CUDA allocator's peak (torch.cuda.max_memory_allocated, no
    CUDA context / NCCL buffers) on a GPU, the process's peak resident size on CPU. Logged by rank 0."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def format_line(m: dict[str, Any], *, total_steps: int) -> str:
    if "val_loss" in m and "loss" not in m:
        return f"step {m['step']:>6}/{total_steps} | validation loss {m['val_loss']:.4f} over {m['val_samples']} sequences"
    mfu = "n/a" if m.get("mfu") is None else f"{100 * m['mfu']:.1f}%"
    tflops = "n/a" if m.get("tflops_per_device") is None else f"{m['tflops_per_device']:.1f}"
    grad = "n/a" if m.get("grad_norm") is None else f"{m['grad_norm']:.3f}"
    skipped = f" | skipped {m['skipped_steps']}" if m.get("skipped_steps") else ""
    return (f"step {m['step']:>6}/{total_steps} | tokens {_si(m['consumed_tokens']):>7} | loss {m['loss']:.4f} | "
            f"lr {m['lr']:.3e} | grad norm {grad} | {_si(m['tokens_per_s_per_device'])} tok/s/dev | "
            f"{tflops} TFLOP/s/dev | MFU {mfu} | mem {m['memory_gb']:.2f} GB{skipped}")


class MetricsLogger:
    """Rank 0 only: construct it with enabled=False on other ranks and every call is a no-op."""

    def __init__(self, *, run_dir: Path, config: LoggingConfig, enabled: bool, total_steps: int,
                 run_name: str, wandb_run_id: str | None, run_config: dict):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.tensorboard = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if config.wandb:
            import wandb

            self.wandb_run = wandb.init(project=config.wandb_project, name=run_name, id=wandb_run_id, resume="allow",
                                        mode=config.wandb_mode, dir=str(run_dir), config=run_config)
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    @property
    def wandb_run_id(self) -> str | None:
        return None if self.wandb_run is None else self.wandb_run.id

    def log(self, metrics: dict[str, Any], *, echo: bool = True) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if echo:
            print(format_line(metrics, total_steps=self.total_steps), flush=True)
        numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and k != "step"}
        if self.wandb_run is not None:
            self.wandb_run.log(numeric, step=metrics["step"])
        if self.tensorboard is not None:
            for key, value in numeric.items():
                self.tensorboard.add_scalar(key, value, metrics["step"])

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[megamobi] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
