"""Put it together: every accepted layout with its memory and step-time estimates, best first."""

from __future__ import annotations

import dataclasses
from collections import Counter

from megamobi.kernels.plan import full_logits_reason
from megamobi.plan.catalogue import GPU
from megamobi.plan.inventory import stages
from megamobi.plan.layouts import SPANS_NODES, Layout, enumerate_layouts, overrides, own_layout, refusal
from megamobi.plan.memory import GIB, MemoryEstimate, estimate_stage_memory
from megamobi.plan.timing import DEFAULT_COMPUTE_FRACTION, StepTime, estimate_step
from megamobi.training.run_config import RunConfig

# The paper's measurement for its own layout (MobiLlama 0.5B, 20 x 8 A100-80GB, pure data
# parallelism, micro batch 5, global batch 800, sequence 2048): about 14-15k tokens/s per GPU.
PAPER = {"model": "mobillama-0.5b", "gpu": "a100-80gb", "world_size": 160, "tensor": 1, "pipeline": 1,
         "micro_batch": 5, "global_batch": 800, "seq_len": 2048, "tokens_per_s_per_gpu": (14_000, 15_000)}


@dataclasses.dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool
    tokens_per_s: float
    tokens_per_s_per_gpu: float

    def to_json(self, run: RunConfig, *, own: bool) -> dict:
        lay = self.layout
        return {"own": own, "overrides": overrides(run, lay),
                "tensor": lay.tensor, "pipeline": lay.pipeline, "data": lay.data, "micro_batch": lay.micro_batch,
                "zero_stage": lay.zero_stage, "activation_checkpointing": lay.activation_checkpointing,
                "sequence_parallel": lay.sequence_parallel, "fits": self.fits, "memory_gb": self.memory.gib(),
                "step_s": round(self.time.step_s, 4), "tokens_per_s": round(self.tokens_per_s, 1),
                "tokens_per_s_per_gpu": round(self.tokens_per_s_per_gpu, 1)}


def evaluate(run: RunConfig, layout: Layout, *, gpu: GPU, gpus_per_node: int,
             compute_fraction: float = DEFAULT_COMPUTE_FRACTION) -> Candidate:
    cfg = run.model_config
    world = layout.tensor * layout.pipeline * layout.data
    stage_list = stages(cfg, tensor=layout.tensor, pipeline=layout.pipeline,
                        partition_method=run.parallel.partition_method)
    micro_batches = run.batch.global_batch_size // (layout.micro_batch * layout.data)
    common = {"pipeline": layout.pipeline, "data": layout.data, "tensor": layout.tensor,
              "micro_batch": layout.micro_batch, "micro_batches": micro_batches, "seq": run.batch.seq_len,
              "precision": run.precision, "zero_stage": layout.zero_stage,
              "activation_checkpointing": layout.activation_checkpointing, "ds_extra": run.deepspeed}
    full_logits = bool(full_logits_reason(mode=run.train.kernels, tensor=layout.tensor, pipeline=layout.pipeline,
                                          zero_stage=layout.zero_stage))
    memory = max((estimate_stage_memory(cfg, st, sequence_parallel=layout.sequence_parallel, full_logits=full_logits,
                                        **common)
                  for st in stage_list), key=lambda m: m.total)
    del common["micro_batch"]
    time = estimate_step(cfg, list(stage_list), gpu=gpu, gpus_per_node=gpus_per_node, micro_batch=layout.micro_batch,
                         compute_fraction=compute_fraction, **{k: v for k, v in common.items()})
    tokens = run.tokens_per_step / time.step_s
    return Candidate(layout=layout, memory=memory, time=time, fits=memory.total <= gpu.memory_gib * GIB,
                     tokens_per_s=tokens, tokens_per_s_per_gpu=tokens / world)


@dataclasses.dataclass(frozen=True)
class Plan:
    candidates: list[Candidate]  # best first: fitting ones by tokens/s, then the rest by tokens/s
    refused: Counter
    own: Candidate | None  # the run config's own layout on this cluster
    own_refusal: str | None
    own_unranked: str | None = None  # why `own` is estimated but not among the candidates


def plan(run: RunConfig, *, nodes: int, gpus_per_node: int, gpu: GPU,
         compute_fraction: float = DEFAULT_COMPUTE_FRACTION) -> Plan:
    world = nodes * gpus_per_node
    layouts, refused = enumerate_layouts(run, world_size=world, gpus_per_node=gpus_per_node)
    candidates = [evaluate(run, lay, gpu=gpu, gpus_per_node=gpus_per_node, compute_fraction=compute_fraction)
                  for lay in layouts]
    candidates.sort(key=lambda c: (not c.fits, -round(c.tokens_per_s, 3), c.memory.total))
    own_refusal = own_unranked = None
    own = None
    if world % (run.parallel.tensor * run.parallel.pipeline) == 0:
        mine = own_layout(run, world)
        own_refusal = refusal(run, mine, world)
        if own_refusal is None:
            own = next((c for c in candidates if c.layout == mine), None)
        if own is None and own_refusal is None:  # the Trainer accepts it, the planner proposes no such layout
            own = evaluate(run, mine, gpu=gpu, gpus_per_node=gpus_per_node, compute_fraction=compute_fraction)
            own_unranked = (f"{SPANS_NODES}: T={mine.tensor} on {gpus_per_node} GPUs per node; timed at the "
                            "InfiniBand bandwidth")
    else:
        own_refusal = (f"world size {world} is not divisible by the config's tensor x pipeline = "
                       f"{run.parallel.tensor} x {run.parallel.pipeline}")
    return Plan(candidates=candidates, refused=refused, own=own, own_refusal=own_refusal, own_unranked=own_unranked)


def paper_comparison(run: RunConfig, result: Plan, *, gpu: GPU) -> str | None:
    """A line comparing the estimates with the paper's measurement, when this IS the paper's setting:
    the config's own layout under each ZeRO stage (the paper itself trained with FSDP full sharding,
    the analogue of ZeRO-3)."""
    own, p = result.own, PAPER
    if own is None:
        return None
    lay = own.layout
    same = (run.model_config.name == p["model"] and gpu.name == p["gpu"]
            and lay.tensor * lay.pipeline * lay.data == p["world_size"] and lay.tensor == p["tensor"]
            and lay.pipeline == p["pipeline"] and lay.micro_batch == p["micro_batch"]
            and run.batch.global_batch_size == p["global_batch"] and run.batch.seq_len == p["seq_len"])
    if not same:
        return None
    by_zero = {c.layout.zero_stage: c.tokens_per_s_per_gpu for c in result.candidates
               if dataclasses.replace(c.layout, zero_stage=lay.zero_stage) == lay}
    estimates = ", ".join(f"ZeRO-{z} {v:,.0f}" for z, v in sorted(by_zero.items()))
    lo, hi = p["tokens_per_s_per_gpu"]
    return (f"paper's layout (pure data parallelism, micro batch 5, global batch 800, 20 x 8 A100): estimated "
            f"tokens/s per GPU {estimates}; the paper measured {lo:,}-{hi:,} (with FSDP full sharding)")
