"""Per-GPU memory of one layout, itemised, for the stage that needs the most.

Static part (parameters, gradients, optimizer state) follows what DeepSpeed 0.19.8 really allocates
with megamobi's ds_config (checked against the engine's own tensors on real CPU runs in
tests/plan/test_static_memory_measured.py). n = parameters on this rank (its tensor shard of its
pipeline stage, the shared FFN's replica counted once per stage), D = data-parallel size:

    precision  ZeRO  optimizer class         params          grads                    optimizer (fp32)
    fp32       0     torch AdamW             4n              4n                       8n  (exp_avg, exp_avg_sq)
    fp32       1, 2  DeepSpeedZeroOptimizer  4n              4n/D + 4n/D copy         12n/D (master + Adam)
    fp32       3     Stage3                  4n/D + 4k       4n/D + 4n/D copy         12n/D
    bf16       1     BF16_Optimizer          2n              4n fp32 + 2n bf16        12n/D
    bf16       2     DeepSpeedZeroOptimizer  2n              2n/D + 4n/D fp32 copy    12n/D
    bf16       3     Stage3                  2n/D + 2k       2n/D + 4n/D fp32 copy    12n/D

k: ZeRO-3's persistent parameters (tensors of at most stage3_param_persistence_threshold elements
stay whole on every rank). "copy": the flat fp32 gradient of the master partition, alive during the
optimizer step. bf16 + ZeRO-0 is refused by the run config (see training.md). Not matched: fp32 with
pipeline parallelism (ZeRO-1), where DeepSpeed holds more gradient buffers than this table says
(about 25% more gradient bytes on the test model; nobody trains a large model in fp32).

Activations: bytes saved for backward, per decoder layer and micro batch, measured on CPU with
torch.autograd.graph.saved_tensors_hooks on megamobi's own layer (e = 2 bytes bf16, 4 fp32; s
sequence, b micro batch, h hidden, i FFN size, T tensor parallel):

    norms               2 (4 + e) sbh    (fp32 copy + normalised input, two norms; / T with sequence parallelism)
    column inputs       2 e sbh          (q/k/v and gate/up inputs: full on every tensor rank)
    inside TP regions   (8 e sbh + 4 e sbi) / T
    full checkpointing  e sbh per layer (3 e sbh in a pipeline, which checkpoints the attention and MLP
                        pieces separately), plus one layer's full set while it is recomputed
    selective           the layer input e sbh, the MLP's own activations kept, the attention recomputed
    outside the layers  12 e sbh (embedding output, final norm, head input)

A pipeline stage keeps min(P - stage, micro batches) micro batches in flight (1F1B); stage 0 the most.
Logits and loss (last stage). Full logits (tensor or pipeline parallel, ZeRO-3, or train.kernels:
plain; megamobi.kernels.plan.full_logits_reason decides, as in the Trainer): the [s b V/T] logits in
the run's dtype, their fp32 copy and log-softmax, and the same again as gradients in backward,
2 (4 + e) sbV / T. Otherwise the chunked (or liger) linear + cross entropy: one chunk of logits
(dtype, fp32 and gradient), the stored input gradient and the fp32 weight gradient with its scaled copy:
chunk V (2e + 4) + e sbh + (8 + e) V h.
"""

from __future__ import annotations

import dataclasses

from megamobi.model_config import ModelConfig
from megamobi.plan.inventory import Stage

GIB = 2**30
# Outside the allocator's peak (what torch.cuda.max_memory_allocated reports): the CUDA context,
# cuBLAS workspaces and NCCL's communicator buffers. An allowance, not a measurement.
FRAMEWORK_ALLOWANCE_GIB = 1.5
FRAGMENTATION = 0.05  # caching-allocator fragmentation on top of what is allocated

# DeepSpeed 0.19.8 defaults (runtime/zero/config.py, engine.py) unless the run's `deepspeed:` says otherwise.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_ALLREDUCE_BUCKET = 500_000_000  # MEMORY_OPT_ALLREDUCE_SIZE, the non-ZeRO / BF16_Optimizer all-reduce


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the worst stage; items: finer names -> bytes (each belongs to one column)."""

    stage: int
    shared_ffn: float  # of params + grads + optimizer: the shared FFN replica's share on this stage
    params: float
    grads: float
    optimizer: float
    activations: float
    other: float
    items: dict[str, float]

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.other

    @property
    def allocated(self) -> float:
        """What the allocator peak (torch.cuda.max_memory_allocated) should show: total less the allowance."""
        return self.total - self.items.get("allowance", 0.0)

    def gib(self) -> dict[str, float]:
        keys = ("params", "grads", "optimizer", "activations", "other", "total")
        return {k: round(getattr(self, k) / GIB, 3) for k in keys}

    def largest_item(self) -> tuple[str, float]:
        return max(self.items.items(), key=lambda kv: kv[1])


def zero_settings(ds_extra: dict) -> dict:
    z = ds_extra.get("zero_optimization", {}) if isinstance(ds_extra, dict) else {}
    return {
        "reduce_bucket": float(z.get("reduce_bucket_size", DS_REDUCE_BUCKET)),
        "prefetch_bucket": float(z.get("stage3_prefetch_bucket_size", z.get("prefetch_bucket_size", DS_PREFETCH_BUCKET))),
        "persistence": float(z.get("stage3_param_persistence_threshold", DS_PERSISTENCE_THRESHOLD)),
        "overlap_comm": z.get("overlap_comm"),
        "contiguous_gradients": z.get("contiguous_gradients", True),
    }


def static_bytes(stage: Stage, *, precision: str, zero_stage: int, data: int, ds_extra: dict) -> dict[str, float]:
    """params / grads / optimizer / comm_buffers bytes of one rank of this stage (see the table above)."""
    n, D = float(stage.params), data
    z = zero_settings(ds_extra)
    persistent = float(sum(t for t in stage.tensors if t <= z["persistence"]))
    e = 2.0 if precision == "bf16" else 4.0
    optimizer = 8 * n if zero_stage == 0 else 12 * n / D
    if zero_stage == 0:
        params, grads = e * n, e * n
    elif zero_stage == 3:
        params, grads = e * n / D + e * persistent, e * n / D + 4 * n / D
    elif e == 2 and zero_stage == 1:  # BF16_Optimizer: full fp32 gradient accumulation buffer
        params, grads = 2 * n, 4 * n + 2 * n
    else:
        params, grads = e * n, e * n / D + 4 * n / D  # the reduced partition + its flat fp32 copy at the step
    # Communication buffers DeepSpeed allocates (transient unless said otherwise).
    if zero_stage == 3:
        largest_piece = max((p.numel for p in stage.pieces), default=0)
        comm = e * z["reduce_bucket"] + e * min(n, z["prefetch_bucket"] + 2 * largest_piece)
    elif zero_stage == 0 or (e == 2 and zero_stage == 1):
        comm = 4.0 * min(n, DS_ALLREDUCE_BUCKET)  # flattened fp32 gradients for the bucketed all-reduce
    else:
        buffers = 2 if z["overlap_comm"] else 1  # double-buffered with overlap_comm (off by default for 1-2)
        comm = e * z["reduce_bucket"] * buffers if z["contiguous_gradients"] else 0.0
    return {"params": params, "grads": grads, "optimizer": optimizer, "comm_buffers": comm}


def layer_activation_bytes(config: ModelConfig, *, seq: int, micro: int, tensor: int, sequence_parallel: bool,
                           e: float, checkpointing: str, pipeline: int) -> tuple[float, float]:
    """(bytes kept per decoder layer and micro batch, bytes of the one layer being recomputed)."""
    sbh, sbi = seq * micro * config.hidden_size, seq * micro * config.intermediate_size
    sp = tensor if sequence_parallel else 1
    norm = (4 + e) * sbh / sp
    mlp_inside = 4 * e * sbi / tensor
    attention = norm + e * sbh + 8 * e * sbh / tensor  # input norm, q/k/v input, inside the heads
    mlp = norm + e * sbh + mlp_inside
    if checkpointing == "full":  # only the inputs of what is recomputed; one layer at a time recomputed
        return (3 if pipeline > 1 else 1) * e * sbh / sp, attention + mlp
    if checkpointing == "selective":  # attention recomputed; the MLP's activations kept
        if pipeline > 1:  # the post-attention norm lives inside the checkpointed AttentionBlockPipe
            return e * sbh / sp + e * sbh + mlp_inside, attention
        return e * sbh / sp + mlp, attention
    return attention + mlp, 0.0


def logits_bytes(config: ModelConfig, *, tokens: int, tensor: int, e: float, full_logits: bool) -> float:
    """Loss-side buffers of one micro batch (see the module docstring)."""
    v, h = config.vocab_size, config.hidden_size
    if full_logits:
        return 2 * (4 + e) * tokens * (-(-v // tensor))
    from megamobi.kernels.loss import default_chunk_tokens

    chunk = min(tokens, default_chunk_tokens(tokens=tokens, hidden=h, vocab=v))
    return chunk * v * (2 * e + 4) + e * tokens * h + (8 + e) * v * h


def estimate_stage_memory(config: ModelConfig, stage: Stage, *, pipeline: int, data: int, tensor: int,
                          micro_batch: int, micro_batches: int, seq: int, precision: str, zero_stage: int,
                          activation_checkpointing: str, sequence_parallel: bool, ds_extra: dict,
                          full_logits: bool = True) -> MemoryEstimate:
    e = 2.0 if precision == "bf16" else 4.0
    static = static_bytes(stage, precision=precision, zero_stage=zero_stage, data=data, ds_extra=ds_extra)
    sbh = seq * micro_batch * config.hidden_size
    sp_div = tensor if sequence_parallel else 1
    per_layer, recompute = layer_activation_bytes(config, seq=seq, micro=micro_batch, tensor=tensor,
                                                  sequence_parallel=sequence_parallel, e=e,
                                                  checkpointing=activation_checkpointing, pipeline=pipeline)
    recompute = recompute if stage.decoder_layers else 0.0
    outside = 12 * e * sbh / sp_div if (stage.has_embedding or stage.has_head) else 0.0
    in_flight = min(pipeline - stage.index, micro_batches)
    activations = in_flight * (stage.decoder_layers * per_layer + outside) + recompute
    logits = logits_bytes(config, tokens=seq * micro_batch, tensor=tensor, e=e, full_logits=full_logits) \
        if stage.has_head else 0.0
    buffers = 2 * config.max_seq_len * config.head_dim * 4.0  # rotary cos/sin tables (fp32)
    allocated = static["params"] + static["grads"] + static["optimizer"] + activations + logits + static["comm_buffers"] + buffers
    allowance = FRAMEWORK_ALLOWANCE_GIB * GIB + FRAGMENTATION * allocated
    items = {
        "params": static["params"], "grads": static["grads"], "optimizer": static["optimizer"],
        "activations": activations, "logits_and_loss": logits, "comm_buffers": static["comm_buffers"],
        "rotary_tables": buffers, "allowance": allowance,
    }
    ffn_share = stage.shared_ffn_params / stage.params if stage.params else 0.0
    shared_ffn = ffn_share * (static["params"] + static["grads"] + static["optimizer"])
    other = logits + static["comm_buffers"] + buffers + allowance
    return MemoryEstimate(stage=stage.index, shared_ffn=shared_ffn, params=static["params"], grads=static["grads"],
                          optimizer=static["optimizer"], activations=activations, other=other, items=items)
