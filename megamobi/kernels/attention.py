"""Attention kernel: flash-attn when it is installed and the tensors suit it, else PyTorch SDPA.

SDPA (megamobi.model.causal_attention) already dispatches to its own flash / cuDNN /
memory-efficient kernels on a GPU, so flash-attn is an option, never a requirement.
"""

from __future__ import annotations

import torch
from torch import nn

from megamobi.model import Attention, causal_attention

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def flash_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Same contract as causal_attention; flash-attn for CUDA bf16/fp16 tensors, SDPA otherwise."""
    if flash_attn_func is None or not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return causal_attention(q, k, v)
    # flash-attn wants [b, t, heads, d] and handles grouped KV heads itself.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


FLASH_PRECISIONS = ("bf16", "fp16")  # flash-attn's kernels take half-precision tensors only


def attention_kernel(*, on_cuda: bool, precision: str) -> str:
    """The name of the attention kernel that will run: "flash-attn" (installed, CUDA, bf16/fp16
    activations) or "sdpa" (an fp32 run on a GPU falls back to SDPA, so its log line says so)."""
    return "flash-attn" if (flash_attn_func is not None and on_cuda and precision in FLASH_PRECISIONS) else "sdpa"


def apply_attention_kernel(model: nn.Module, kernel: str) -> int:
    """Point every Attention module at the chosen kernel; returns how many were changed."""
    fn = flash_causal_attention if kernel == "flash-attn" else causal_attention
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    for module in modules:
        module.attend = fn
    return len(modules)
