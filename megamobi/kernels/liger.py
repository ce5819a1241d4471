"""liger-kernel (Triton) for MobiLlama, used only when importable AND the model runs on CUDA:
fused RMSNorm, rotary embedding, SwiGLU, and the fused linear + cross entropy that never holds the
[tokens, vocab] logits. Each is installed in place (class swap or function attribute), so parameter
names, state_dict keys and the DeepSpeed engine's view of the model do not change.

Arithmetic matches megamobi.model's: RMSNorm in fp32 then cast to the input dtype before the weight
("llama" casting mode), rotary in the rotate-half layout, SwiGLU as silu(gate) * up. Checked against
the plain path on a GPU by tests/kernels/test_gpu_kernels.py (skipped without CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from megamobi.model import MLP, Attention, RMSNorm

try:
    from liger_kernel.transformers.functional import (
        liger_fused_linear_cross_entropy,
        liger_rms_norm,
        liger_rope,
        liger_swiglu,
    )
except ImportError:  # CPU machines, or no liger-kernel / triton installed
    liger_fused_linear_cross_entropy = liger_rms_norm = liger_rope = liger_swiglu = None

LAYER_KERNELS = ("rmsnorm", "rotary", "swiglu")


def liger_available() -> bool:
    return liger_rms_norm is not None


class LigerRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return liger_rms_norm(x, self.weight, self.eps, casting_mode="llama", in_place=False)


class LigerSwiGLUMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def liger_rotate_query_key(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # liger wants cos/sin [1, seq, head_dim] in the activations' dtype; ours are [seq, head_dim] fp32.
    return liger_rope(q, k, cos[None].to(q.dtype), sin[None].to(q.dtype))


def apply_liger_layer_kernels(model: nn.Module) -> list[str]:
    """Swap RMSNorm, rotary and SwiGLU for liger's kernels in place; returns the kernels applied."""
    for module in model.modules():
        if type(module) is RMSNorm:
            module.__class__ = LigerRMSNorm
        elif type(module) is MLP:
            module.__class__ = LigerSwiGLUMLP
        elif isinstance(module, Attention):
            module.rotate = liger_rotate_query_key
    return list(LAYER_KERNELS)


def liger_loss_for(head: nn.Linear):
    """(hidden, labels) -> mean cross entropy through `head.weight`, by liger's fused kernel."""

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return liger_fused_linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight,
                                                labels.reshape(-1), ignore_index=-100, accum_dtype=torch.float32)

    return loss_fn
