"""The one check of a device a user or a launcher chose: `cpu`, `cuda` or `cuda:N`, and whether this
machine has it. Without it, `--device cuda` on a CPU-only machine ends deep inside torch in
"AssertionError: Torch not compiled with CUDA enabled", and LOCAL_RANK 5 on a 4-GPU node in a CUDA
"invalid device ordinal" from every rank.
"""

from __future__ import annotations

import re

from megamobi.cli_support import UserError


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(text: str | None, *, arg: str = "--device") -> str:
    """`text` (None: cuda when available, else cpu) if this machine has that device; else a UserError
    whose message names `arg`, what was asked and what there is."""
    if text is None:
        return default_device()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise UserError(f"{arg} {text}: unknown device; use cpu, cuda or cuda:N")
    if text == "cpu":
        return text
    import torch

    if not torch.cuda.is_available():
        built = "this torch has no CUDA support" if torch.version.cuda is None else "torch sees no CUDA device"
        raise UserError(f"{arg} {text}: no CUDA device on this machine ({built}); use {arg} cpu")
    index = int(text.split(":")[1]) if ":" in text else 0
    count = torch.cuda.device_count()
    if index >= count:
        raise UserError(f"{arg} {text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return text


def check_local_rank_device(local_rank: int) -> None:
    """A rank about to take GPU `local_rank` of its node: refuse more ranks per node than GPUs."""
    import torch

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"LOCAL_RANK {local_rank}: this node has {count} CUDA device(s); start at most {count} "
                        "processes per node (NPROC_PER_NODE, or --num_gpus / --nproc_per_node)")
