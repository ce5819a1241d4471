"""liger-kernel's four kernels through megamobi's kernel plan, on CPU, under Triton's interpreter
(TRITON_INTERPRET=1, set by tests/conftest.py for CPU builds of torch), against the plain path.

The interpreter runs the kernels' Python bodies with numpy. Four places where it differs from a GPU
are bridged by the TEST-ONLY shim below (nothing in megamobi uses it):
  1. float kernel arguments (RMSNorm's eps, SwiGLU's gate multiplier) arrive as Python floats, and
     liger calls `.to(tl.float32)` on them; a GPU launch passes them as fp32 scalars: so does the shim;
  2. libdevice's `rsqrt` (RMSNorm) has no interpreter version: the shim gives `tl.rsqrt`;
  3. fp32 -> bf16 casts truncate; a GPU rounds to nearest even: so does the shim (through torch);
  4. bf16 arithmetic runs on the raw uint16 bits (SwiGLU's bf16 product gives NaN): the shim computes
     it in fp32 and rounds once to bf16, as the GPU's bf16 instructions do.
It is written for the pinned triton / liger-kernel (requirements/triton-interpreter.txt) and the tests
skip, saying why, under other versions. Tolerances: fp32 within 1e-5 relative of the plain path (fp32
rounding; measured up to ~1e-6); bf16 within 1.5x the plain path's error against float64.
"""

from __future__ import annotations

import dataclasses
import math
import os
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_paths import relative_error, run_paths

from megamobi.kernels import liger
from megamobi.kernels.loss import IGNORE_INDEX, chunked_linear_cross_entropy
from megamobi.kernels.plan import choose_kernels
from megamobi.model import language_model_loss, rotary_tables, rotate_query_key
from megamobi.model_config import load_model_config

PINS = dict(line.split("==") for line in
            (Path(__file__).resolve().parents[2] / "requirements" / "triton-interpreter.txt").read_text().splitlines()
            if line and not line.startswith("#"))


def why_not_runnable() -> str | None:
    if torch.version.cuda is not None:
        return "a CUDA build of torch: tests/kernels/test_gpu_kernels.py runs liger on the GPU instead"
    for name in PINS:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            return f"{name} is not installed (requirements/triton-interpreter.txt)"
        if installed != PINS[name]:
            return f"the interpreter shim is written for {name} {PINS[name]}, installed is {installed}"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (tests/conftest.py sets it for CPU builds of torch)"
    return None


pytestmark = pytest.mark.skipif(why_not_runnable() is not None, reason=str(why_not_runnable()))
CONFIG = dataclasses.replace(load_model_config("tiny"), num_layers=2, vocab_size=512)


@pytest.fixture(scope="module", autouse=True)
def interpreter_shim():
    import liger_kernel.ops.rms_norm as liger_rms_norm_module
    import triton.language as tl
    from triton.runtime import interpreter

    if not isinstance(liger_rms_norm_module._rms_norm_forward_kernel, interpreter.InterpretedFunction):
        pytest.skip("liger-kernel was imported before TRITON_INTERPRET was set: its kernels are not interpreted")
    builder = interpreter.InterpreterBuilder
    to_tensor, cast, binary_op = interpreter._implicit_cvt, builder.cast_impl, builder.binary_op

    def as_fp32_scalar(arg):  # 1.
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return to_tensor(arg)

    def bf16_bits_to_fp32(bits):
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float().numpy()

    def fp32_to_bf16_bits(values):
        values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    def rounding_cast(self, src, dst_type):  # 3.
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(fp32_to_bf16_bits(src.data), tl.bfloat16)
        return cast(self, src, dst_type)

    def bf16_arithmetic(self, lhs, rhs, op):  # 4.
        if lhs.dtype.scalar == tl.bfloat16 and lhs.data.dtype == np.uint16 and rhs.data.dtype == np.uint16:
            out = op(bf16_bits_to_fp32(lhs.data), bf16_bits_to_fp32(rhs.data))
            return interpreter.TensorHandle(out if out.dtype == np.bool_ else fp32_to_bf16_bits(out), tl.bfloat16)
        return binary_op(self, lhs, rhs, op)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpreter, "_implicit_cvt", as_fp32_scalar)
        patch.setattr(liger_rms_norm_module, "rsqrt", lambda x: tl.rsqrt(x))  # 2. (looked up when traced)
        patch.setattr(builder, "cast_impl", rounding_cast)
        patch.setattr(builder, "binary_op", bf16_arithmetic)
        yield


def liger_plan():
    """The plan a GPU run with liger-kernel installed gets (on_cuda=True), applied here to CPU tensors."""
    plan = choose_kernels(mode="auto", on_cuda=True, precision="bf16")
    assert plan.liger_layers == ("rmsnorm", "rotary", "swiglu") and plan.loss == "liger-fused-linear-cross-entropy"
    return plan


@pytest.mark.parametrize("checkpointing, kv_heads", [("none", None), ("full", 2), ("selective", 3)])
def test_all_four_liger_kernels_match_the_plain_path_in_fp32(checkpointing, kv_heads):
    """RMSNorm, rotary, SwiGLU and the fused linear + cross entropy in one model: loss and every
    parameter's gradient, with ignored labels, multi-head and grouped KV heads, each checkpointing mode."""
    config = dataclasses.replace(CONFIG, activation_checkpointing=checkpointing, num_key_value_heads=kv_heads)
    paths = run_paths(liger_plan(), config=config, dtype=torch.float32)
    paths.assert_kernels_match_plain(rtol=1e-5)


def test_all_four_liger_kernels_in_bf16_are_as_accurate_as_the_plain_path():
    config = dataclasses.replace(CONFIG, num_key_value_heads=2)
    paths = run_paths(liger_plan(), config=config, dtype=torch.bfloat16)
    paths.assert_kernels_as_accurate_as_plain()
    assert relative_error(paths.kernels.loss, paths.plain.loss) < 4e-3


def test_liger_rotary_keeps_the_fp32_tables():
    """bf16 activations rotated with the fp32 tables round once, as the plain path does: the same bits.
    Casting the tables to bf16 first (what megamobi did before) is measurably less accurate."""
    cos, sin = rotary_tables(head_dim=64, max_seq_len=256, theta=10000.0)
    torch.manual_seed(0)
    q = torch.randn(1, 2, 256, 64).bfloat16()
    k = torch.randn(1, 1, 256, 64).bfloat16()
    plain = rotate_query_key(q, k, cos, sin)
    got = liger.liger_rotate_query_key(q.clone(), k.clone(), cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, plain))
    exact = rotate_query_key(q.double(), k.double(), cos.double(), sin.double())
    bf16_tables = liger.liger_functions().liger_rope(q.clone(), k.clone(), cos[None].bfloat16(), sin[None].bfloat16())
    print("rotary error vs float64: fp32 tables", relative_error(plain[0], exact[0]), "bf16 tables",
          relative_error(bf16_tables[0], exact[0]))
    assert relative_error(bf16_tables[0], exact[0]) > 1.3 * relative_error(plain[0], exact[0])


def test_every_loss_path_gives_nan_when_every_label_is_ignored():
    """F.cross_entropy's mean over no tokens is 0 / 0 = NaN, and so is the chunked loss; liger's fused
    kernel alone returned 0.0, hiding a batch with nothing to learn. Now all three agree: NaN loss, zero
    gradients (the chunked loss's were NaN)."""
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, requires_grad=True)
    head = torch.nn.Linear(16, 32, bias=False)
    labels = torch.full((6,), IGNORE_INDEX)
    losses = {
        "plain": language_model_loss(head(hidden)[None], labels[None]),
        "chunked": chunked_linear_cross_entropy(hidden, head.weight, labels),
        "liger": liger.liger_loss_for(head)(hidden, labels),
    }
    for name, loss in losses.items():
        hidden.grad = None
        loss.backward()
        assert math.isnan(loss.item()) and torch.equal(hidden.grad, torch.zeros_like(hidden)), name
    # With at least one kept label the guard changes nothing: the same loss as the plain path.
    labels[2] = 7
    got, ref = liger.liger_loss_for(head)(hidden, labels), language_model_loss(head(hidden)[None], labels[None])
    assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item())
