"""What each rank holds: the model's pieces, tensor-parallel split and assigned to pipeline stages
exactly as megamobi.parallel builds them, counted from the config (no model is built).

The pieces mirror megamobi.parallel.pipeline.pipeline_layers:

    Embedding, [AttentionBlock_i, MLP_i] x L, Head

With a shared FFN every MLP_i is the same tied module: a stage that holds any MLP_i holds ONE
replica of all of it. Stages are cut with DeepSpeed's partition algorithms (restated here; tests/plan compare them with
DeepSpeed's) and the run's `parallel.partition_method`, so the planner's stages are the engine's stages.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from megamobi.model_config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Piece:
    kind: str  # "embedding", "attention", "mlp", "head"
    tensors: tuple[int, ...]  # numel of each parameter on this tensor rank
    tied: bool = False  # the shared FFN: one replica per stage however many MLP_i the stage holds

    @property
    def numel(self) -> int:
        return sum(self.tensors)


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    pieces: tuple[Piece, ...]
    decoder_layers: int
    has_embedding: bool
    has_head: bool
    has_mlp: bool

    @property
    def tensors(self) -> list[int]:
        """numel of every parameter this rank holds (the shared FFN's replica once)."""
        out: list[int] = []
        tied_done = False
        for piece in self.pieces:
            if piece.tied:
                if tied_done:
                    continue
                tied_done = True
            out.extend(piece.tensors)
        return out

    @property
    def params(self) -> int:
        return sum(self.tensors)

    @property
    def shared_ffn_params(self) -> int:
        return next((p.numel for p in self.pieces if p.tied), 0)


def pieces(config: ModelConfig, *, tensor: int) -> list[Piece]:
    c, t = config, tensor
    d, hd = c.hidden_size, c.head_dim
    vocab_local = -(-c.vocab_size // t)  # padded to a multiple of T, zero rows
    kv_dim = c.kv_heads * hd
    attention = Piece("attention", (d * d // t, d * kv_dim // t, d * kv_dim // t, d * d // t, d, d))
    shared = c.ffn_sharing == "shared"
    mlp = Piece("mlp", (d * c.intermediate_size // t,) * 3, tied=shared)
    out = [Piece("embedding", (vocab_local * d,))]
    for _ in range(c.num_layers):
        out += [attention, mlp]
    out.append(Piece("head", (d, vocab_local * d)))
    return out


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform, restated so the planner needs no DeepSpeed import
    (which prints to stdout); tests/plan check that both agree."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: list[float], num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_balanced: the linear-partition dynamic programme minimising
    (largest part - smallest part), with DeepSpeed's tie-breaking (the last k reaching the best cost)."""
    n, m = len(weights), num_parts
    if n <= m:
        return partition_uniform(n, m)
    inf = float("inf")
    dp_max = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_min = [[inf] * (m + 1) for _ in range(n + 1)]
    dp_cost = [[inf] * (m + 1) for _ in range(n + 1)]
    position = [[0] * (m + 1) for _ in range(n + 1)]
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    dp_max[0][0] = dp_cost[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, min(i, m) + 1):
            for k in range(i):
                part = prefix[i] - prefix[k]
                max_sum, min_sum = max(dp_max[k][j - 1], part), min(dp_min[k][j - 1], part)
                cost = max_sum - min_sum
                if dp_cost[i][j] >= cost:
                    dp_cost[i][j], dp_max[i][j], dp_min[i][j], position[i][j] = cost, max_sum, min_sum, k
    parts = [n]
    for j in reversed(range(1, m + 1)):
        parts.append(position[parts[-1]][j])
    return parts[::-1]


PIPE_CLASS_NAMES = {"embedding": "EmbeddingPipe", "attention": "AttentionBlockPipe", "mlp": "MLPBlockPipe",
                    "head": "HeadPipe"}


def stage_bounds(items: list[Piece], *, pipeline: int, partition_method: str) -> list[int]:
    """DeepSpeed PipelineModule._partition_layers for these pieces (no model built)."""
    method = partition_method.lower()
    if pipeline == 1:
        return [0, len(items)]
    if method == "uniform":
        return partition_uniform(len(items), pipeline)
    if method == "parameters":
        return partition_balanced([p.numel for p in items], pipeline)
    if method.startswith("type:"):
        pattern = re.compile(method.split(":", 1)[1], re.IGNORECASE)
        return partition_balanced([1 if pattern.search(PIPE_CLASS_NAMES[p.kind]) else 0 for p in items], pipeline)
    raise ValueError(f"partition method {partition_method!r} is not one DeepSpeed implements")


@functools.cache
def stages(config: ModelConfig, *, tensor: int, pipeline: int, partition_method: str = "parameters") -> tuple[Stage, ...]:
    items = pieces(config, tensor=tensor)
    bounds = stage_bounds(items, pipeline=pipeline, partition_method=partition_method)
    out = []
    for s in range(pipeline):
        mine = tuple(items[bounds[s]:bounds[s + 1]])
        kinds = [p.kind for p in mine]
        out.append(Stage(index=s, pieces=mine, decoder_layers=kinds.count("attention"),
                         has_embedding="embedding" in kinds, has_head="head" in kinds, has_mlp="mlp" in kinds))
    return tuple(out)


def stage_problem(config: ModelConfig, stage_list: tuple[Stage, ...]) -> str | None:
    """The refusal megamobi.parallel.pipeline's builder would raise for this partition, or None."""
    if len(stage_list) > 1 and config.ffn_sharing == "shared":
        empty = [s.index for s in stage_list if not s.has_mlp]
        if empty:
            return (f"stage(s) {empty} would hold no decoder layer's FFN, so the shared FFN could not be tied "
                    f"across all stages (the pipeline builder refuses this partition)")
    return None
