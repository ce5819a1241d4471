"""GPUs the planner knows, with where each figure comes from. Override any of them on the command line
(--peak-tflops, --memory-gb, --intra-gbps, --inter-gbps) for a GPU or cluster not listed here.

Units: peak in dense bf16 TFLOP/s (no sparsity); memory in GiB (2^30 bytes, what nvidia-smi's MiB
total gives and what the Trainer's memory_gb reports); bandwidths in GB/s (10^9 bytes) per GPU in one
direction: `intra` over NVLink inside a node, `inter` over InfiniBand between nodes (the usual
one-NIC-per-GPU "rail" design), `hbm` to the GPU's own memory.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    memory_gib: float
    intra_gbps: float
    inter_gbps: float
    hbm_gbps: float
    fp32_tflops: float  # plain fp32 (megamobi leaves PyTorch's TF32 off), for precision: fp32 runs
    source: str


CATALOGUE: dict[str, GPU] = {g.name: g for g in (
    GPU("a100-40gb", peak_tflops=312.0, memory_gib=40.0, intra_gbps=300.0, inter_gbps=25.0, hbm_gbps=1555.0, fp32_tflops=19.5,
        source="NVIDIA A100 datasheet (SXM4): 312 TFLOP/s dense bf16, 19.5 fp32, 40 GB HBM2 (40960 MiB), 1555 GB/s; "
               "NVLink 3 600 GB/s bidirectional = 300 per direction; HDR InfiniBand 200 Gb/s = 25 GB/s per GPU "
               "(DGX A100: 8 HDR NICs for 8 GPUs)"),
    GPU("a100-80gb", peak_tflops=312.0, memory_gib=80.0, intra_gbps=300.0, inter_gbps=25.0, hbm_gbps=2039.0, fp32_tflops=19.5,
        source="NVIDIA A100 datasheet (SXM4): 312 TFLOP/s dense bf16, 19.5 fp32, 80 GB HBM2e (81920 MiB), 2039 GB/s; "
               "NVLink 3 600 GB/s bidirectional; HDR InfiniBand 200 Gb/s = 25 GB/s per GPU (DGX A100)"),
    GPU("h100-80gb", peak_tflops=989.0, memory_gib=79.6, intra_gbps=450.0, inter_gbps=50.0, hbm_gbps=3350.0, fp32_tflops=67.0,
        source="NVIDIA H100 datasheet (SXM5): 989 TFLOP/s dense bf16 (1979 with sparsity), 67 fp32, 80 GB HBM3 "
               "(81559 MiB), 3.35 TB/s; NVLink 4 900 GB/s bidirectional = 450 per direction; NDR InfiniBand "
               "400 Gb/s = 50 GB/s per GPU (DGX H100: 8 NDR NICs)"),
    GPU("h200-141gb", peak_tflops=989.0, memory_gib=140.4, intra_gbps=450.0, inter_gbps=50.0, hbm_gbps=4800.0, fp32_tflops=67.0,
        source="NVIDIA H200 datasheet (SXM): 989 TFLOP/s dense bf16, 67 fp32, 141 GB HBM3e (143771 MiB), 4.8 TB/s; "
               "NVLink 4 900 GB/s bidirectional; NDR InfiniBand 400 Gb/s = 50 GB/s per GPU (DGX H200)"),
)}


def gpu_with_overrides(name: str, *, peak_tflops: float | None = None, memory_gib: float | None = None,
                       intra_gbps: float | None = None, inter_gbps: float | None = None) -> GPU:
    """The catalogue entry `name` with any given figure replaced (KeyError for an unknown name).
    peak_tflops replaces the peak of whatever precision the run uses (bf16 and fp32 alike)."""
    gpu = CATALOGUE[name]
    changes = {k: v for k, v in (("peak_tflops", peak_tflops), ("fp32_tflops", peak_tflops), ("memory_gib", memory_gib),
                                 ("intra_gbps", intra_gbps), ("inter_gbps", inter_gbps)) if v is not None}
    if changes:
        gpu = dataclasses.replace(gpu, **changes, source=gpu.source + f"; overridden: {changes}")
    return gpu
