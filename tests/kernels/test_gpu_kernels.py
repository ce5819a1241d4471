"""GPU-only kernels against the plain path (skipped without CUDA; bench/gpu_check.sh runs them on a GPU).

Each builds the same tiny MobiLlama twice in bf16 (as DeepSpeed's bf16 mode holds it), applies one
kernel choice to the second, and compares the loss and every parameter's gradient by relative error.
"""

import dataclasses

import pytest
import torch

from megamobi.kernels import attention as attention_kernels
from megamobi.kernels import liger
from megamobi.kernels.plan import apply_kernels, choose_kernels
from megamobi.model import MobiLlama, language_model_loss
from megamobi.model_config import load_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_check.sh)")
needs_liger = pytest.mark.skipif(not liger.liger_available(), reason="liger-kernel is not installed")
CONFIG = dataclasses.replace(load_model_config("tiny"), num_layers=4)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def compare(plan, *, dtype=torch.bfloat16, loss_tol=1e-2, grad_tol=3e-2):
    torch.manual_seed(0)
    plain = MobiLlama(CONFIG).to("cuda", dtype)
    other = MobiLlama(CONFIG).to("cuda", dtype)
    other.load_state_dict(plain.state_dict())
    loss_fn = apply_kernels(other, plan, loss_fn=language_model_loss)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, 129), device="cuda")
    ref = language_model_loss(plain(tokens[:, :-1]), tokens[:, 1:])
    got = loss_fn(other(tokens[:, :-1]), tokens[:, 1:])
    ref.backward()
    got.backward()
    assert abs(got.item() - ref.item()) <= loss_tol * abs(ref.item()), (got.item(), ref.item())
    for (name, a), b in zip(plain.named_parameters(), other.parameters()):
        assert relative_error(b.grad, a.grad) < grad_tol, (name, relative_error(b.grad, a.grad))
    return plan


def test_chunked_loss_on_cuda_bf16():
    plan = compare(choose_kernels(mode="auto", on_cuda=False))  # on_cuda=False: no liger, the chunked loss
    assert plan.loss == "chunked-linear-cross-entropy"


@needs_liger
def test_liger_layers_and_fused_linear_cross_entropy():
    plan = compare(choose_kernels(mode="auto", on_cuda=True))
    assert plan.liger_layers == ("rmsnorm", "rotary", "swiglu") and plan.loss == "liger-fused-linear-cross-entropy"


def test_inductor_compiled_layers_match_eager():
    compare(choose_kernels(mode="auto", on_cuda=False, compile_backend="inductor"))


def test_inductor_compiled_layers_fp32():
    compare(choose_kernels(mode="auto", on_cuda=False, compile_backend="inductor"), dtype=torch.float32,
            loss_tol=1e-4, grad_tol=1e-3)


@pytest.mark.skipif(attention_kernels.flash_attn_func is None, reason="flash-attn is not installed")
def test_flash_attention_matches_sdpa():
    plan = compare(choose_kernels(mode="auto", on_cuda=True))
    assert plan.attention == "flash-attn"
