"""tests/multiproc.py starts ranks by fork on CPU and by spawn where CUDA is usable (the GPU machine of
bench/gpu_check.sh). The spawn path is checked here on CPU, so the GPU run does not meet it first."""

from pathlib import Path

import torch
import torch.distributed as dist
from multiproc import run_ranks, start_method


def _rank_report(rank: int, scale: float) -> tuple[float, bool]:
    total = torch.tensor([(rank + 1) * scale])
    dist.all_reduce(total)
    spawned = b"spawn_main" in Path("/proc/self/cmdline").read_bytes()  # a fresh interpreter, not a fork
    return total.item(), spawned


def test_spawned_ranks_run_the_same_gloo_job_as_forked_ones():
    assert start_method() == ("spawn" if torch.cuda.is_available() else "fork")
    forked = run_ranks(_rank_report, world_size=2, args=(2.0,), method="fork")
    spawned = run_ranks(_rank_report, world_size=2, args=(2.0,), method="spawn")
    assert forked == [(6.0, False), (6.0, False)]
    assert spawned == [(6.0, True), (6.0, True)]
