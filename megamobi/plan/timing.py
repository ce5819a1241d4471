"""Step time of one layout: compute at a stated fraction of peak, plus the communication DeepSpeed
0.19.8 does and how much of it hides behind compute.

    compute      FLOPs of the stage (megamobi.model's formula: the shared FFN counted in every layer;
                 full activation checkpointing adds one more forward of the decoder layers, selective
                 one more forward of their attention blocks) at
                 peak x compute_fraction (the bf16 peak, or the plain fp32 one for fp32 runs)
    tensor       4 all-reduces of [s, b, h] per layer and micro batch (2 forward, 2 backward; 2 more
                 for a checkpointed layer's recompute) + 2 for embedding and head; synchronous
    pipeline     1F1B: (micro batches + P - 1) x the slowest stage's time per micro batch; activations
                 sent forward and gradients back at every stage boundary
    data         ZeRO-0 and bf16 ZeRO-1 (BF16_Optimizer): fp32 gradient all-reduce after the last
                 backward (not overlapped), then bf16 ZeRO-1 all-gathers the updated bf16 weights.
                 fp32 ZeRO-1/2 and bf16 ZeRO-2: reduce-scatter of the gradients in backward (blocking,
                 overlap_comm is off by default for stages 1-2) + all-gather of the weights after the step.
                 ZeRO-3: all-gather of the weights in forward and backward and reduce-scatter of the
                 gradients every micro batch, overlapped with compute (overlap_comm on by default).
    shared FFN   with P > 1: all-reduce of the FFN's (fp32) gradient over all pipeline stages
                 (DeepSpeed's ReduceTiedGrads), after the last backward, not overlapped
    optimizer    AdamW reads and writes about 32 bytes per local fp32 master parameter at HBM speed

A ring collective over n ranks moves 2(n-1)/n (all-reduce) or (n-1)/n (reduce-scatter, all-gather)
of the buffer per rank, at the link's bandwidth x COMM_EFFICIENCY: NVLink when EVERY such group lies
within a node, InfiniBand otherwise (the slowest group sets the pace of a synchronous collective).
Pipeline sends cross a node boundary somewhere as soon as the job spans nodes.
"""

from __future__ import annotations

import dataclasses

from megamobi.model_config import ModelConfig
from megamobi.plan.catalogue import GPU
from megamobi.plan.inventory import Stage

COMM_EFFICIENCY = 0.8  # NCCL bus bandwidth / link bandwidth, typical of large messages
DEFAULT_COMPUTE_FRACTION = 0.5  # achievable share of dense peak in the model's matmuls and attention


@dataclasses.dataclass(frozen=True)
class StepTime:
    step_s: float
    parts: dict[str, float]  # seconds per step of each component (exposed, i.e. not hidden by compute)


def _ring(bytes_: float, ranks: int, bandwidth_gbps: float, *, all_reduce: bool) -> float:
    if ranks <= 1 or bytes_ <= 0:
        return 0.0
    factor = 2 * (ranks - 1) / ranks if all_reduce else (ranks - 1) / ranks
    return factor * bytes_ / (bandwidth_gbps * 1e9 * COMM_EFFICIENCY)


def _link(span_ranks: int, gpus_per_node: int, gpu: GPU) -> float:
    """Bandwidth of groups whose members lie within blocks of `span_ranks` consecutive global ranks
    (aligned at multiples of it): all inside nodes only when the block size divides the node size."""
    return gpu.intra_gbps if gpus_per_node % span_ranks == 0 else gpu.inter_gbps


def layer_flops_per_token(config: ModelConfig, seq: int) -> float:
    c = config
    attention = 2 * c.hidden_size ** 2 + 2 * c.hidden_size * c.kv_heads * c.head_dim
    mlp = 3 * c.hidden_size * c.intermediate_size
    return 6 * (attention + mlp) + 12 * c.hidden_size * seq


def estimate_step(config: ModelConfig, stages: list[Stage], *, gpu: GPU, gpus_per_node: int, tensor: int,
                  pipeline: int, data: int, micro_batch: int, micro_batches: int, seq: int, precision: str,
                  zero_stage: int, activation_checkpointing: str, ds_extra: dict,
                  compute_fraction: float = DEFAULT_COMPUTE_FRACTION) -> StepTime:
    e = 2.0 if precision == "bf16" else 4.0
    tokens = seq * micro_batch
    flops_rate = (gpu.peak_tflops if e == 2 else gpu.fp32_tflops) * 1e12 * compute_fraction
    layer_flops = layer_flops_per_token(config, seq)
    head_flops = 6 * config.vocab_size * config.hidden_size
    tp_bw = _link(tensor, gpus_per_node, gpu)
    act_bytes = tokens * config.hidden_size * e
    z3_overlap = zero_stage == 3
    # A recomputed forward: the whole layer ("full") or its attention block ("selective").
    c = config
    attention_fwd = 2 * (2 * c.hidden_size ** 2 + 2 * c.hidden_size * c.kv_heads * c.head_dim) + 4 * c.hidden_size * seq
    recompute_flops = {"full": layer_flops / 3, "selective": attention_fwd}.get(activation_checkpointing, 0.0)
    recompute_allreduces = {"full": 2, "selective": 1}.get(activation_checkpointing, 0)

    per_stage, compute_s, tp_s = [], 0.0, 0.0
    for st in stages:
        flops = tokens * (st.decoder_layers * (layer_flops + recompute_flops) + (head_flops if st.has_head else 0.0)) / tensor
        t_compute = flops / flops_rate
        n_allreduce = st.decoder_layers * (4 + recompute_allreduces) + st.has_embedding + st.has_head
        t_tp = n_allreduce * _ring(act_bytes, tensor, tp_bw, all_reduce=True)
        t_z3 = 0.0
        if z3_overlap:  # gathers in forward and backward + reduce-scatter, hidden behind compute when possible
            t_z3 = 3 * _ring(e * st.params, data, _link(data * tensor, gpus_per_node, gpu), all_reduce=False)
        t_p2p = 0.0
        if pipeline > 1:
            p2p_bw = _link(pipeline * tensor * data, gpus_per_node, gpu)  # the whole job in one node, or not
            t_p2p = 2 * act_bytes / (p2p_bw * 1e9 * COMM_EFFICIENCY)
        per_stage.append(max(t_compute + t_tp, t_z3) + t_p2p)
        compute_s, tp_s = max(compute_s, t_compute), max(tp_s, t_tp)
    slots = micro_batches + pipeline - 1 if pipeline > 1 else micro_batches
    pipeline_s = slots * max(per_stage)

    worst = max(stages, key=lambda s: s.params)
    n = float(worst.params)
    dp_bw = _link(data * tensor, gpus_per_node, gpu)
    if zero_stage == 0:
        dp_s = _ring(e * n, data, dp_bw, all_reduce=True)  # fp32 only: bf16 + ZeRO-0 is refused
    elif zero_stage == 1 and e == 2:  # BF16_Optimizer: fp32 all-reduce, then bf16 all-gather of the weights
        dp_s = _ring(4 * n, data, dp_bw, all_reduce=True) + _ring(2 * n, data, dp_bw, all_reduce=False)
    elif zero_stage in (1, 2):
        reduces = micro_batches if zero_stage == 2 else 1
        dp_s = reduces * _ring(e * n, data, dp_bw, all_reduce=False) + _ring(e * n, data, dp_bw, all_reduce=False)
    else:
        dp_s = 0.0  # inside the per-micro-batch time above
    tie_s = 0.0
    if pipeline > 1 and config.ffn_sharing == "shared":
        tie_s = _ring(4 * worst.shared_ffn_params, pipeline, _link(tensor * data * pipeline, gpus_per_node, gpu),
                      all_reduce=True)
    master = n / data if zero_stage >= 1 else n
    optimizer_s = 32 * master / (gpu.hbm_gbps * 1e9)
    parts = {"compute": micro_batches * compute_s, "tensor_comm": micro_batches * tp_s,
             "pipeline_bubble": (pipeline - 1) * max(per_stage) if pipeline > 1 else 0.0,
             "data_comm": dp_s, "shared_ffn_tie": tie_s, "optimizer": optimizer_s}
    return StepTime(step_s=pipeline_s + dp_s + tie_s + optimizer_s, parts=parts)
