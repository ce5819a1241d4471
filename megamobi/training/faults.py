"""Fault injection for tests and drills: MEGAMOBI_FAULTS (docs/reliability.md).

    MEGAMOBI_FAULTS="hang:step=3:rank=1;slow:rank=0:ms=200" bash launch/pretrain.sh RUN.yaml

`;`-separated faults `KIND:key=value:...`:

    hang:step=N:rank=R        rank R stops making progress just before step N (sleeps forever)
    slow:rank=R:ms=M          rank R sleeps M ms in every step (inside its forward pass)
    nan:step=N:rank=R         rank R's loss at step N is NaN, the first time step N runs (a transient fault)
    poison:step=N:rank=R      the samples rank R trains on at step N give a NaN loss whenever trained on (bad data)
    spike:step=N:rank=R:x=F   rank R's loss at step N is multiplied by F, the first time step N runs
    flip:step=N:rank=R        after step N's update, one bit of one element of a replicated parameter flips on rank R
    kill:step=N:rank=R        rank R kills itself with SIGKILL at step N (`:during=save`: in the save after step N)

Steps count from 1, as logged; ranks are global ranks. A bad string is a user error (exit 2, naming the
wrong part); a run with faults prints one warning line naming every fault. Unset: nothing here runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time

from megamobi.config_io import ConfigError

ENV = "MEGAMOBI_FAULTS"

# kind -> (required keys, optional keys)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "hang": (("step", "rank"), ()),
    "slow": (("rank", "ms"), ()),
    "nan": (("step", "rank"), ()),
    "poison": (("step", "rank"), ()),
    "spike": (("step", "rank", "x"), ()),
    "flip": (("step", "rank"), ()),
    "kill": (("step", "rank"), ("during",)),
}


class FaultError(ConfigError):
    """A MEGAMOBI_FAULTS string that cannot be understood, or that names a rank or step the run lacks."""


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int | None = None
    ms: float | None = None
    x: float | None = None
    during: str | None = None

    def describe(self) -> str:
        where = f"rank {self.rank}"
        if self.kind == "slow":
            return f"slow {self.ms:g} ms every step on {where}"
        if self.kind == "spike":
            return f"spike x{self.x:g} at step {self.step} on {where}"
        if self.kind == "kill" and self.during:
            return f"kill during the save after step {self.step} on {where}"
        return f"{self.kind} at step {self.step} on {where}"


def _number(text: str, *, key: str, entry: str, integer: bool) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise FaultError(f"{ENV}: {entry!r}: {key}={text!r} is not {kind}") from None
    if not math.isfinite(value):
        raise FaultError(f"{ENV}: {entry!r}: {key}={text!r} must be finite")
    return value


def _parse_entry(entry: str) -> Fault:
    kind, *parts = entry.split(":")
    kind = kind.strip()
    if kind not in KINDS:
        raise FaultError(f"{ENV}: {entry!r}: unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    required, optional = KINDS[kind]
    values: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise FaultError(f"{ENV}: {entry!r}: {part!r} is not key=value")
        if key not in required + optional:
            raise FaultError(f"{ENV}: {entry!r}: {kind} takes no {key!r} (it takes {', '.join(required + optional)})")
        if key in values:
            raise FaultError(f"{ENV}: {entry!r}: {key} is given twice")
        values[key] = value
    missing = [k for k in required if k not in values]
    if missing:
        raise FaultError(f"{ENV}: {entry!r}: {kind} needs {', '.join(f'{k}=' for k in missing)}")
    fields: dict = {"kind": kind}
    for key, text in values.items():
        if key == "during":
            if text != "save":
                raise FaultError(f"{ENV}: {entry!r}: during={text!r}: the only choice is during=save")
            fields[key] = text
            continue
        value = _number(text, key=key, entry=entry, integer=key in ("step", "rank"))
        if key == "step" and value < 1:
            raise FaultError(f"{ENV}: {entry!r}: step={text}: steps count from 1, as logged")
        if key == "rank" and value < 0:
            raise FaultError(f"{ENV}: {entry!r}: rank={text}: ranks count from 0")
        if key in ("ms", "x") and value <= 0:
            raise FaultError(f"{ENV}: {entry!r}: {key}={text} must be positive")
        fields[key] = value
    return Fault(**fields)


def parse_faults(text: str | None) -> list[Fault]:
    """The faults of a MEGAMOBI_FAULTS string; empty entries (a trailing ';') are ignored."""
    if not text or not text.strip():
        return []
    return [_parse_entry(entry.strip()) for entry in text.split(";") if entry.strip()]


def faults_from_env() -> list[Fault]:
    return parse_faults(os.environ.get(ENV))


def check_faults_for_run(faults: list[Fault], *, world_size: int, total_steps: int) -> None:
    """A fault the run can never meet is a mistake in the string, refused before anything starts."""
    for fault in faults:
        if fault.rank >= world_size:
            raise FaultError(f"{ENV}: {fault.kind} names rank={fault.rank}, but the run has {world_size} rank(s) "
                             f"(0..{world_size - 1})")
        if fault.step is not None and fault.step > total_steps:
            raise FaultError(f"{ENV}: {fault.kind} names step={fault.step}, but the run has {total_steps} steps")


def warning_line(faults: list[Fault]) -> str:
    return (f"warning: {ENV} injects {len(faults)} fault(s), for tests and drills only: "
            + "; ".join(f.describe() for f in faults))


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


class FaultInjector:
    """This rank's share of the faults, applied at the points the training loop calls. Keeps which
    steps have already run, so `nan` and `spike` strike only the first time a step runs."""

    def __init__(self, faults: list[Fault], *, rank: int):
        self.faults = faults
        self.mine = [f for f in faults if f.rank == rank]
        self.runs_of_step: dict[int, int] = {}
        # (data stage, window) of every poisoned sample: filled by the trainer after a `poison` step's first run
        self.poisoned_windows: set[tuple[int, int]] = set()
        self._slowed: tuple[int, int] | None = None  # (step, how many times it ran) last slowed down

    def __bool__(self) -> bool:
        return bool(self.faults)

    def _mine(self, kind: str, step: int | None = None) -> list[Fault]:
        return [f for f in self.mine if f.kind == kind and (step is None or f.step == step)]

    def before_step(self, step: int) -> None:
        """At the start of step `step` (before its data is read): hang, kill."""
        self.runs_of_step[step] = self.runs_of_step.get(step, 0) + 1
        if any(f.during is None for f in self._mine("kill", step)):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._mine("hang", step):
            sleep_forever()

    def forward_delay(self, step: int) -> None:
        """Once per step (in its first forward pass; again when a rewind re-runs it): the `slow` sleep."""
        run = (step, self.runs_of_step.get(step, 0))
        if run != self._slowed:
            self._slowed = run
            for fault in self._mine("slow"):
                time.sleep(fault.ms / 1000)

    def loss(self, value, *, step: int, windows: list[tuple[int, int]] | None):
        """The loss of one micro-batch as the faults make it."""
        first_run = self.runs_of_step.get(step, 0) == 1
        if first_run and self._mine("nan", step):
            value = value * float("nan")
        if first_run:
            for fault in self._mine("spike", step):
                value = value * fault.x
        if self._mine("poison", step) or (windows is not None and self.poisoned_windows.intersection(windows)):
            value = value * float("nan")
        return value

    def flip_after_update(self, step: int, flip) -> None:
        """`flip()` flips one bit of a replicated parameter on this rank (the trainer knows which)."""
        if self.runs_of_step.get(step, 0) == 1 and self._mine("flip", step):
            flip()

    def during_save(self, step: int) -> None:
        if any(f.during == "save" for f in self._mine("kill", step)):
            os.kill(os.getpid(), signal.SIGKILL)
