"""Starting torch.distributed the way every megamobi process does, under deepspeed, torchrun or srun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Initialise the default process group from the launcher's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT): NCCL on GPUs, gloo on CPU. Safe to call twice."""
    if dist.is_initialized():
        return
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles a shared-memory all-reduce on first init on CPU (about a minute); it is
    # only used for inference, so we switch it off.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
