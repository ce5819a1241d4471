"""tests/multiproc.py starts ranks by fork on CPU and by spawn where CUDA is usable (the GPU machine of
bench/gpu_check.sh). The spawn path is checked here on CPU, so the GPU run does not meet it first; on
a GPU the same test checks that a spawned rank can start CUDA (NCCL, one rank per GPU)."""

from pathlib import Path

import torch
import torch.distributed as dist
from multiproc import run_ranks, start_method


def _rank_report(rank: int, scale: float) -> tuple[float, bool]:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = torch.tensor([(rank + 1) * scale], device=device)
    dist.all_reduce(total)
    spawned = b"spawn_main" in Path("/proc/self/cmdline").read_bytes()  # a fresh interpreter, not a fork
    return total.item(), spawned


def test_spawned_ranks_run_the_same_job_as_forked_ones():
    on_cuda = torch.cuda.is_available()
    world = min(2, torch.cuda.device_count()) if on_cuda else 2
    total = sum((rank + 1) * 2.0 for rank in range(world))
    assert start_method() == ("spawn" if on_cuda else "fork")
    assert run_ranks(_rank_report, world_size=world, args=(2.0,), method="spawn") == [(total, True)] * world
    if not on_cuda:  # a forked rank cannot start CUDA: why spawn is used there
        assert run_ranks(_rank_report, world_size=world, args=(2.0,), method="fork") == [(total, False)] * world
