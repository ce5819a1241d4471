"""Stragglers: which rank slows the whole job down, named every train.log_interval steps.

In synchronous training every rank's step takes as long as the slowest one's: the others wait in the
gradient all-reduce. So a rank's own speed is measured where no data-parallel collective waits:
the time inside its forward passes (device time, with CUDA events on a GPU) and the time it waits
for its batches. Every logging step the ranks all-gather these two numbers (averaged per step over
the window); a rank whose forward + data time exceeds train.straggler_ratio x the median of its
peers (the ranks of its pipeline stage, which do the same work), and by more than 50 ms, is named
with its host in the log and in metrics.jsonl (`stragglers`).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

# A rank must also be this much slower than the median (seconds a step) to be named: timer noise on
# tiny steps (a CPU demo's few milliseconds) is not a straggler; real steps take seconds.
MIN_EXCESS_S = 0.05


class StepTimes:
    """This rank's forward and data-wait time since the last `take()`, from hooks on the model."""

    def __init__(self, module: torch.nn.Module):
        self.cuda = torch.cuda.is_available()
        self._events: list[tuple] = []
        self._started = None
        self.forward_s = 0.0
        self.data_s = 0.0
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args) -> None:
        if torch.is_grad_enabled():  # training forwards only, not validation
            if self.cuda:
                self._started = torch.cuda.Event(enable_timing=True)
                self._started.record()
            else:
                self._started = time.perf_counter()

    def _after(self, module, args, output) -> None:
        if self._started is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._started, end))
        else:
            self.forward_s += time.perf_counter() - self._started
        self._started = None

    def add_data_wait(self, seconds: float) -> None:
        self.data_s += seconds

    def take(self) -> tuple[float, float]:
        """(forward seconds, data seconds) since the last call."""
        if self._events:
            self._events[-1][1].synchronize()
            self.forward_s += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        taken = (self.forward_s, self.data_s)
        self.forward_s = self.data_s = 0.0
        return taken


def find_stragglers(times: list[tuple[float, float]], *, stage_of: list[int], ratio: float) -> list[dict]:
    """[{rank, step_time_s, forward_s, data_s, median_s, ratio}] for every rank slower than `ratio` x
    the median of the ranks of its pipeline stage (alone in its stage: never named)."""
    named = []
    for stage in sorted(set(stage_of)):
        peers = [r for r, s in enumerate(stage_of) if s == stage]
        if len(peers) < 2:
            continue
        median = statistics.median(sum(times[r]) for r in peers)
        for rank in peers:
            busy = sum(times[rank])
            if median > 0 and busy > ratio * median and busy - median > MIN_EXCESS_S:
                named.append({"rank": rank, "step_time_s": round(busy, 6), "forward_s": round(times[rank][0], 6),
                              "data_s": round(times[rank][1], 6), "median_s": round(median, 6),
                              "ratio": round(busy / median, 3)})
    return named


def gather_step_times(timer: StepTimes, *, steps: int, device) -> list[tuple[float, float]]:
    """Every rank's (forward, data) seconds per step over the last `steps` steps (collective)."""
    forward, data = timer.take()
    mine = torch.tensor([forward / max(steps, 1), data / max(steps, 1)], dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [(float(t[0]), float(t[1])) for t in everyone]


def describe(stragglers: list[dict], hosts: list[str]) -> str:
    return "; ".join(f"rank {s['rank']} ({hosts[s['rank']]}) {s['step_time_s']:.3f} s a step = {s['ratio']:.1f}x the "
                     f"median {s['median_s']:.3f} s of its peers (forward {s['forward_s']:.3f} s, data {s['data_s']:.3f} s)"
                     for s in stragglers)
