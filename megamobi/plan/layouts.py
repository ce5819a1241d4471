"""Every layout of a run on a given cluster, checked by the Trainer's own validation.

A candidate is the run config with parallel.tensor / pipeline / zero_stage / sequence_parallel,
batch.micro_batch_size and the model's activation_checkpointing replaced (dataclasses.replace), and
it is kept only if `RunConfig.validate(world_size=..., check_data=False)` accepts it and the pipeline
builder's partition check (every stage holds the shared FFN) passes: the same checks the Trainer
runs, so nothing proposed here is refused at launch. Tensor-parallel groups stay inside a node:
T must divide the GPUs per node (with 3 GPUs a node, T = 2 would put ranks 2 and 3 on two nodes),
because megamobi's tensor all-reduces are synchronous and every layer makes four. A config whose own
T does not divide them is still estimated, at the inter-node bandwidth, and marked so (planner.py).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from megamobi.config_io import ConfigError
from megamobi.model_config import CHECKPOINTING_MODES, checkpointing_mode
from megamobi.plan.inventory import stage_problem, stages
from megamobi.training.run_config import RunConfig


@dataclasses.dataclass(frozen=True)
class Layout:
    tensor: int
    pipeline: int
    data: int
    micro_batch: int
    zero_stage: int
    activation_checkpointing: str  # "none", "full" or "selective" (megamobi.model_config)
    sequence_parallel: bool


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def with_layout(run: RunConfig, layout: Layout) -> RunConfig:
    model = dataclasses.replace(run.model_config, activation_checkpointing=layout.activation_checkpointing)
    return dataclasses.replace(
        run, model=model,
        batch=dataclasses.replace(run.batch, micro_batch_size=layout.micro_batch),
        parallel=dataclasses.replace(run.parallel, tensor=layout.tensor, pipeline=layout.pipeline,
                                     zero_stage=layout.zero_stage, sequence_parallel=layout.sequence_parallel))


SPANS_NODES = "tensor groups would span nodes (T must divide the GPUs per node)"


def overrides(run: RunConfig, layout: Layout) -> list[str]:
    """The `key=value` overrides that turn the run config into `layout` (none for its own layout): what
    to append to `pretrain` / `launch/pretrain.sh`. D follows from the world size."""
    mine = own_layout(run, layout.tensor * layout.pipeline * layout.data)
    changes = [("parallel.tensor", layout.tensor, mine.tensor), ("parallel.pipeline", layout.pipeline, mine.pipeline),
               ("parallel.zero_stage", layout.zero_stage, mine.zero_stage),
               ("parallel.sequence_parallel", layout.sequence_parallel, mine.sequence_parallel),
               ("batch.micro_batch_size", layout.micro_batch, mine.micro_batch),
               ("model.activation_checkpointing", layout.activation_checkpointing, mine.activation_checkpointing)]
    return [f"{key}={str(new).lower() if isinstance(new, bool) else new}" for key, new, old in changes if new != old]


def own_layout(run: RunConfig, world_size: int) -> Layout:
    p = run.parallel
    return Layout(tensor=p.tensor, pipeline=p.pipeline, data=world_size // (p.tensor * p.pipeline),
                  micro_batch=run.batch.micro_batch_size, zero_stage=p.zero_stage,
                  activation_checkpointing=checkpointing_mode(run.model_config.activation_checkpointing),
                  sequence_parallel=p.sequence_parallel)


def refusal(run: RunConfig, layout: Layout, world_size: int) -> str | None:
    """Why the Trainer would refuse this layout (its ConfigError text), or None."""
    candidate = with_layout(run, layout)
    try:
        candidate.validate(world_size=world_size, check_data=False)
    except ConfigError as err:
        return str(err)
    if layout.pipeline > 1:
        return stage_problem(candidate.model_config, stages(candidate.model_config, tensor=layout.tensor,
                                                            pipeline=layout.pipeline,
                                                            partition_method=run.parallel.partition_method))
    return None


def enumerate_layouts(run: RunConfig, *, world_size: int, gpus_per_node: int) -> tuple[list[Layout], Counter]:
    """(accepted layouts, Counter of refusal reasons) for every T, P, D, micro batch, ZeRO stage,
    checkpointing and sequence-parallel choice."""
    accepted, refused = [], Counter()
    gb = run.batch.global_batch_size
    for t in _divisors(world_size):
        if t > gpus_per_node:
            continue
        spans_nodes = gpus_per_node % t != 0
        for p in _divisors(world_size // t):
            d = world_size // (t * p)
            if gb % d:
                refused["global batch not divisible by the data-parallel size"] += 1
                continue
            for micro in _divisors(gb // d):
                for zero in (0, 1, 2, 3):
                    for ckpt in CHECKPOINTING_MODES:
                        for sp in ((False, True) if t > 1 else (False,)):
                            layout = Layout(t, p, d, micro, zero, ckpt, sp)
                            why = SPANS_NODES if spans_nodes else refusal(run, layout, world_size)
                            if why is None:
                                accepted.append(layout)
                            else:
                                refused[_reason_kind(why)] += 1
    return accepted, refused


def _reason_kind(message: str) -> str:
    """A short, countable form of a refusal: the first clause of the Trainer's message, cut at a word."""
    first = message.split(";")[0]
    return first if len(first) <= 110 else first[:110].rsplit(" ", 1)[0] + " ..."
