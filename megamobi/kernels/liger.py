"""liger-kernel (Triton) for MobiLlama, used only when importable AND the model runs on CUDA:
fused RMSNorm, rotary embedding, SwiGLU, and the fused linear + cross entropy that never holds the
[tokens, vocab] logits. Each is installed in place (class swap or function attribute), so parameter
names, state_dict keys and the DeepSpeed engine's view of the model do not change.

Arithmetic matches megamobi.model's: RMSNorm in fp32 then cast to the input dtype before the weight
("llama" casting mode), rotary in the rotate-half layout with the fp32 tables (as the plain path),
SwiGLU as silu(gate) * up, and a mean loss that is NaN when every label is ignored (as
F.cross_entropy). Checked against the plain path on CPU under Triton's interpreter
(tests/kernels/test_liger_interpreter.py) and on a GPU (tests/kernels/test_gpu_kernels.py).

liger-kernel is imported on first use, not with this module: its import (and Triton's) costs 1-2 s
that CPU runs, which never use it, should not pay.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from megamobi.kernels.loss import IGNORE_INDEX
from megamobi.model import MLP, Attention, RMSNorm

LAYER_KERNELS = ("rmsnorm", "rotary", "swiglu")


@functools.cache
def liger_functions():
    """liger_kernel.transformers.functional, or None when liger-kernel (or Triton) is not installed."""
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def liger_available() -> bool:
    return liger_functions() is not None


class LigerRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return liger_functions().liger_rms_norm(x, self.weight, self.eps, casting_mode="llama", in_place=False)


class LigerSwiGLUMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(liger_functions().liger_swiglu(self.gate_proj(x), self.up_proj(x)))


def liger_rotate_query_key(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # liger wants cos/sin [1, seq, head_dim]. They stay fp32 (DeepSpeed's bf16 mode keeps buffers fp32):
    # liger computes in the tables' dtype and rounds once to q's, as megamobi.model.apply_rotary does;
    # bf16 tables would add their own rounding (at T = 2048, head_dim 64: 2.7e-3 error vs 1.7e-3).
    return liger_functions().liger_rope(q, k, cos[None], sin[None])


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
    fused = liger_functions().liger_fused_linear_cross_entropy

    def loss_fn(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.reshape(-1)
        loss = fused(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels, ignore_index=IGNORE_INDEX,
                     accum_dtype=torch.float32)
        # liger returns 0.0 when every label is ignored; F.cross_entropy and the chunked loss give NaN
        # (0 / 0) with zero gradients, which the Trainer reports as a non-finite step: the same here,
        # on the device, without a host sync (the gradient through the kept branch is exactly 1).
        kept = (labels != IGNORE_INDEX).any()
        return torch.where(kept, loss, torch.full_like(loss, float("nan")))

    return loss_fn
