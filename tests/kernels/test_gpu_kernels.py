"""GPU-only kernels against the plain path (skipped without CUDA; bench/gpu_check.sh runs them on a GPU).

Each runs the same tiny MobiLlama three ways (tests/kernels/kernel_paths.py): plain in the run's dtype,
with one kernel choice applied, and a float64 reference, with parameters in bf16 and the rotary tables
fp32 as DeepSpeed's bf16 mode holds them. In bf16 each path's error against float64 is compared (the
plain bf16 path itself is ~1.5e-2 off on some gradients, so a fixed tolerance between the two would
either flake or hide a bug); in fp32 the kernels match the plain path to fp32 rounding.
"""

import dataclasses

import pytest
import torch
from kernel_paths import run_paths

from megamobi.kernels import attention as attention_kernels
from megamobi.kernels import liger
from megamobi.kernels.plan import KernelPlan, choose_kernels
from megamobi.model_config import load_model_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run by bench/gpu_check.sh)")
needs_liger = pytest.mark.skipif(not liger.liger_available(), reason="liger-kernel is not installed")
CONFIG = dataclasses.replace(load_model_config("tiny"), num_layers=4)
GQA = dataclasses.replace(CONFIG, num_key_value_heads=2)


def check(plan: KernelPlan, *, config=CONFIG, dtype=torch.bfloat16) -> KernelPlan:
    paths = run_paths(plan, config=config, dtype=dtype, device="cuda", batch=4, seq=128)
    if dtype == torch.float32:
        paths.assert_kernels_match_plain(rtol=1e-3)  # SDPA's and Inductor's kernels reorder fp32 sums (TF32 off)
    else:
        paths.assert_kernels_as_accurate_as_plain()
    return plan


def test_chunked_loss_on_cuda_bf16():
    plan = check(choose_kernels(mode="auto", on_cuda=False))  # on_cuda=False: no liger, the chunked loss
    assert plan.loss == "chunked-linear-cross-entropy"


@needs_liger
@pytest.mark.parametrize("config", [CONFIG, GQA], ids=["mha", "gqa"])
def test_liger_layers_and_fused_linear_cross_entropy(config):
    plan = check(choose_kernels(mode="auto", on_cuda=True), config=config)
    assert plan.liger_layers == ("rmsnorm", "rotary", "swiglu") and plan.loss == "liger-fused-linear-cross-entropy"


@needs_liger
def test_liger_in_fp32_matches_the_plain_path():
    check(choose_kernels(mode="auto", on_cuda=True, precision="fp32"), dtype=torch.float32)


def test_inductor_compiled_layers_match_eager():
    check(choose_kernels(mode="auto", on_cuda=False, compile_backend="inductor"))


def test_inductor_compiled_layers_fp32():
    check(choose_kernels(mode="auto", on_cuda=False, compile_backend="inductor"), dtype=torch.float32)


@pytest.mark.skipif(attention_kernels.flash_attn_func is None,
                    reason="flash-attn is not installed (bench/wheels does not carry it: docs/performance.md)")
@pytest.mark.parametrize("config", [CONFIG, GQA], ids=["mha", "gqa"])
def test_flash_attention_alone_matches_sdpa(config):
    """flash-attn on its own: the plain plan (SDPA, full logits) with only the attention kernel swapped."""
    plain = choose_kernels(mode="plain", on_cuda=True)
    plan = check(dataclasses.replace(plain, attention="flash-attn"), config=config)
    assert choose_kernels(mode="auto", on_cuda=True, precision="bf16").attention == "flash-attn"
    assert choose_kernels(mode="auto", on_cuda=True, precision="fp32").attention == "sdpa"
    assert plan.liger_layers == () and plan.loss == "full-logits"
