"""Data stages: a run's training data as an ordered list of stages, each with its own data config.

A run config's `data:` section either names one data config (`paths`, `source_weights`, `val_fraction`:
one stage that runs to the end) or lists `stages`, each with its own `paths` / `source_weights` /
`val_fraction` and an `until_tokens` (the last stage has none: it runs to the end). This module reads
both forms, from the typed config or from the plain dict a checkpoint recorded, into `DataStage`s, and
answers which stage a step trains on. It imports neither torch nor the training code, so replay,
`megamobi.checkpoints` and evaluate use it too.

Boundaries are in tokens and are turned into steps by one rule everywhere (stages, the wsd decay
start): a step trains on stage i when the tokens consumed BEFORE it are below stage i's until_tokens,
so stage i ends at the first step whose tokens reach until_tokens, i.e. until_tokens rounded up to
whole global batches.

Each stage has its own shuffle, seeded by the run's data.seed and the stage's index; stage 0 uses
data.seed itself, so a run without stages IS the one-stage case: same order, and a running plain run can
gain stages on resume (its data becomes stage 0, untouched). Each stage's validation split is chosen by
data.seed over its own paths (as without stages): stages over the same directories with the same
val_fraction hold out the same samples.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_STAGE_SEED_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio odd constant: stage seeds far apart from each other


def stage_seed(seed: int, index: int) -> int:
    """The shuffle seed of stage `index` (0-based): data.seed for stage 0, a distinct one after."""
    if index == 0:
        return seed
    return (seed + index * _STAGE_SEED_STRIDE) & 0x7FFFFFFFFFFFFFFF


@dataclasses.dataclass(frozen=True)
class DataStage:
    index: int  # 0-based position in data.stages
    name: str | None
    paths: list[str]
    source_weights: dict[str, float] | None
    val_fraction: float
    seed: int  # the validation split's seed: data.seed
    shuffle_seed: int  # this stage's order: stage_seed(data.seed, index)
    until_tokens: int | None  # None: runs to the end of the run
    staged: bool = True  # False: the run has no data.stages (its data section is this one stage)

    @property
    def number(self) -> int:
        """1-based, as people count stages (and steps) in logs and tables."""
        return self.index + 1

    @property
    def key(self) -> str:
        """Where this stage's settings live in the run config."""
        return f"data.stages[{self.index}]" if self.staged else "data"

    def label(self) -> str:
        return f"stage {self.number}" + (f" '{self.name}'" if self.name else "")

    def data_record(self) -> dict[str, Any]:
        """The data config of a provenance segment (what replay rebuilds the order from)."""
        record = {"paths": list(self.paths), "source_weights": self.source_weights, "val_fraction": self.val_fraction,
                  "seed": self.seed}
        if self.shuffle_seed != self.seed:  # stage 0's record is the one a run without stages writes
            record["shuffle_seed"] = self.shuffle_seed
        return record


def stages_of(data: dict[str, Any]) -> list[DataStage]:
    """The stages of a run config's `data` section (the typed config as a dict, or as a checkpoint recorded it)."""
    seed = data.get("seed", 1234)
    listed = data.get("stages")
    if not listed:
        return [DataStage(index=0, name=None, paths=list(data.get("paths") or []), source_weights=data.get("source_weights"),
                          val_fraction=data.get("val_fraction", 0.0), seed=seed, shuffle_seed=seed, until_tokens=None,
                          staged=False)]
    return [DataStage(index=i, name=s.get("name"), paths=list(s["paths"]), source_weights=s.get("source_weights"),
                      val_fraction=s.get("val_fraction", 0.0), seed=seed, shuffle_seed=stage_seed(seed, i),
                      until_tokens=s.get("until_tokens") if i < len(listed) - 1 else None)
            for i, s in enumerate(listed)]


def all_paths(stages: list[DataStage]) -> list[str]:
    """Every data directory of every stage, once, in order of first use."""
    return list(dict.fromkeys(p for s in stages for p in s.paths))


def stage_index_at(stages: list[DataStage], consumed_tokens: int) -> int:
    """The stage (0-based) of the step that starts after `consumed_tokens` tokens."""
    for stage in stages:
        if stage.until_tokens is None or consumed_tokens < stage.until_tokens:
            return stage.index
    return stages[-1].index


def first_step_at_tokens(tokens: int, *, tokens_per_step: int) -> int:
    """0-based index of the first step whose tokens consumed before it reach `tokens` (a step count)."""
    return -(-tokens // tokens_per_step)


def checkpoint_stage(manifest: dict[str, Any]) -> DataStage | None:
    """The stage a checkpoint's run was training (its `data_stage` record; stage 0 for older checkpoints)."""
    data = (manifest.get("run_config") or {}).get("data")
    if not isinstance(data, dict):
        return None
    stages = stages_of(data)
    index = (manifest.get("data_stage") or {}).get("index", 0)
    return stages[min(index, len(stages) - 1)]


@dataclasses.dataclass(frozen=True)
class StagePosition:
    """Where one step sits: its stage, and its first position in that stage's own order."""

    stage: DataStage
    step: int  # 1-based, as logged
    position: int  # first position of the step in the stage's shuffled order (samples since the stage began)
    start_samples: int  # samples consumed when the stage began
    start_tokens: int  # tokens consumed when the stage began
    first_step: int  # the stage's first step
    begins: bool  # this step is the stage's first

    def record(self, *, consumed_tokens: int, end_tokens: int) -> dict[str, Any]:
        """The `data_stage` entry of a checkpoint saved after this step (read back by StageCursor)."""
        return {"index": self.stage.index, "number": self.stage.number, "name": self.stage.name,
                "first_step": self.first_step, "start_samples": self.start_samples, "start_tokens": self.start_tokens,
                "tokens": consumed_tokens - self.start_tokens, "planned_tokens": end_tokens - self.start_tokens}


# What a checkpoint from before stages (or of a run without them) stands for: stage 0 since step 1.
STAGE_ZERO = {"index": 0, "start_samples": 0, "start_tokens": 0, "first_step": 1}


class StageCursor:
    """The stage of every step, from the consumed tokens before it; a stage's order starts at position 0
    at its first step. `resumed` is the resumed checkpoint's `data_stage` record (STAGE_ZERO for one from
    before stages), None for a fresh run."""

    def __init__(self, stages: list[DataStage], *, resumed: dict[str, Any] | None) -> None:
        self.stages = stages
        self._index = None if resumed is None else resumed["index"]
        self._start = None if resumed is None else (resumed["start_samples"], resumed["start_tokens"], resumed["first_step"])

    def step(self, *, step: int, consumed_samples: int, consumed_tokens: int) -> StagePosition:
        index = stage_index_at(self.stages, consumed_tokens)
        begins = index != self._index
        if begins:
            self._index, self._start = index, (consumed_samples, consumed_tokens, step)
        start_samples, start_tokens, first_step = self._start
        return StagePosition(stage=self.stages[index], step=step, position=consumed_samples - start_samples,
                             start_samples=start_samples, start_tokens=start_tokens, first_step=first_step, begins=begins)
