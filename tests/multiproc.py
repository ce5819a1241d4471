"""Real multi-process torch.distributed jobs for tests, started by fork so torch and DeepSpeed are
imported once: a 4-rank gloo job then costs about a second instead of ~15 s of fresh interpreters.
Where CUDA is usable the ranks are spawned instead (start_method()): CUDA cannot start in a forked
child of a process that has already asked it anything.

    results = run_ranks(my_job, world_size=4, args=(tmp_path,))   # my_job(rank, *args) on every rank

Each rank gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, one intra-op thread and an
initialised gloo default group (through megamobi.distributed.init_distributed, as in training).
The return values come back in rank order; an exception on any rank fails the test with that
rank's traceback.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback

import torch


def start_method() -> str:
    """"fork" on CPU; "spawn" where CUDA is usable. Collection alone calls torch.cuda.is_available()
    (liger-kernel's device probe, DeepSpeed's accelerator), which poisons fork: a forked rank then dies
    at set_device with "Cannot re-initialize CUDA in forked subprocess". Spawned ranks re-import torch,
    DeepSpeed and the test module (seconds each), so `fn` and `args` must be picklable: module-level
    functions, not lambdas or closures."""
    return "spawn" if torch.cuda.is_available() else "fork"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank: int, world_size: int, port: int, args: tuple, queue) -> None:
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
        from megamobi.distributed import init_distributed

        init_distributed()
        result = fn(rank, *args)
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def start_ranks(fn, *, world_size: int, args: tuple = (), method: str | None = None):
    """Start the ranks without waiting: (processes, result queue). For tests that kill -9 a job."""
    context = multiprocessing.get_context(method or start_method())
    queue = context.SimpleQueue()
    port = free_port()
    procs = [context.Process(target=_child, args=(fn, r, world_size, port, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    return procs, queue


def run_ranks(fn, *, world_size: int, args: tuple = (), timeout: float = 600.0, method: str | None = None) -> list:
    procs, queue = start_ranks(fn, world_size=world_size, args=args, method=method)
    results: dict[int, object] = {}
    failures: list[str] = []
    try:
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(failures) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed job did not finish in {timeout:.0f} s")
            if queue.empty():
                if any(p.exitcode not in (None, 0) for p in procs) and queue.empty():
                    # A rank died without reporting (e.g. a segfault); the others may hang waiting on it.
                    time.sleep(1.0)
                    if queue.empty():
                        codes = [p.exitcode for p in procs]
                        raise RuntimeError(f"a rank died without reporting; exit codes {codes}; {failures}")
                time.sleep(0.01)
                continue
            rank, ok, payload = queue.get()
            if ok:
                results[rank] = payload
            else:
                failures.append(f"--- rank {rank} ---\n{payload}")
                break  # the other ranks are likely blocked in a collective: stop them
    finally:
        for p in procs:
            p.join(timeout=0 if failures else 30)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("distributed job failed:\n" + "\n".join(failures))
    return [results[r] for r in range(world_size)]
