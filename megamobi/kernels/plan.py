"""Which kernels a run uses, decided once at start and logged as one line, then applied in place.

    plan = choose_kernels(mode="auto", on_cuda=True, precision="bf16", tensor=1, pipeline=1, zero_stage=1)
    loss_fn = apply_kernels(model, plan, loss_fn=language_model_loss)   # model: MobiLlama or PipelineModule
    print(plan.describe())

`train.kernels: auto` (default) takes, where each applies:
  attention   flash-attn (installed, CUDA, bf16) else PyTorch SDPA
  layers      liger-kernel RMSNorm / rotary / SwiGLU (installed, CUDA, not compiled: with
              train.compile Inductor generates the fused element-wise kernels itself)
  loss        liger's fused linear + cross entropy (installed, CUDA), else megamobi's chunked linear +
              cross entropy in plain PyTorch; both never hold the [tokens, vocab] fp32 logits. Only for
              T = 1, P = 1 and ZeRO 0-2 (see `full_logits_reason`); otherwise the model's own loss.
  optimizer   torch's fused AdamW when the parameters are on CUDA (megamobi.training.optimizer)
`train.kernels: plain` keeps the model exactly as megamobi/model.py writes it (SDPA, full logits).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from megamobi.config_io import ConfigError
from megamobi.kernels.attention import apply_attention_kernel, attention_kernel
from megamobi.kernels.compile import COMPILE_BACKENDS, compile_decoder_layers
from megamobi.kernels.liger import apply_liger_layer_kernels, liger_available, liger_loss_for
from megamobi.kernels.loss import chunked_loss_for, defer_lm_head

KERNEL_MODES = ("auto", "plain")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    mode: str
    attention: str                  # "flash-attn" | "sdpa"
    liger_layers: tuple[str, ...]   # liger kernels inside the layers, () when none
    loss: str                       # "liger-fused-linear-cross-entropy" | "chunked-linear-cross-entropy" | "full-logits"
    loss_note: str                  # why the full logits are kept, or ""
    compile_backend: str | None     # None: eager
    fused_adamw: bool

    def describe(self) -> str:
        liger = ", ".join(self.liger_layers) if self.liger_layers else "none"
        loss = self.loss + (f" ({self.loss_note})" if self.loss_note else "")
        compiled = f"torch.compile ({self.compile_backend}) per decoder layer" if self.compile_backend else "eager"
        return (f"kernels ({self.mode}): attention {self.attention}, liger layers {liger}, loss {loss}, "
                f"{compiled}, AdamW {'fused' if self.fused_adamw else 'per-tensor'}")


def full_logits_reason(*, mode: str, tensor: int, pipeline: int, zero_stage: int) -> str:
    """Why a run keeps the plain lm_head + cross entropy ("" when the fused/chunked loss applies)."""
    if mode == "plain":
        return "train.kernels: plain"
    if tensor > 1:
        return "tensor parallel: each rank holds only its vocabulary slice of the logits; vocab-parallel cross entropy"
    if pipeline > 1:
        return "pipeline: the head stage returns logits to DeepSpeed's loss_fn"
    if zero_stage == 3:
        return "ZeRO-3 gathers the lm_head weight only inside its own forward"
    return ""


def choose_kernels(*, mode: str = "auto", on_cuda: bool, precision: str = "bf16", tensor: int = 1, pipeline: int = 1,
                   zero_stage: int = 1, compile_backend: str | None = None) -> KernelPlan:
    if mode not in KERNEL_MODES:
        raise ConfigError(f"train.kernels must be one of {', '.join(KERNEL_MODES)}, got {mode!r}")
    auto = mode == "auto"
    liger = auto and on_cuda and liger_available()
    note = full_logits_reason(mode=mode, tensor=tensor, pipeline=pipeline, zero_stage=zero_stage)
    fused = "liger-fused-linear-cross-entropy" if liger else "chunked-linear-cross-entropy"
    loss = "full-logits" if note else fused
    return KernelPlan(
        mode=mode,
        attention=attention_kernel(on_cuda=on_cuda, precision=precision) if auto else "sdpa",
        liger_layers=("rmsnorm", "rotary", "swiglu") if (liger and compile_backend is None) else (),
        loss=loss, loss_note=note, compile_backend=compile_backend, fused_adamw=on_cuda)


def apply_kernels(model: nn.Module, plan: KernelPlan, *, loss_fn: LossFn) -> LossFn:
    """Apply the plan to a built model in place; returns the loss function to use with its output
    (`loss_fn` itself when the full logits are kept; else one taking the final hidden states)."""
    apply_attention_kernel(model, plan.attention)
    if plan.liger_layers:
        apply_liger_layer_kernels(model)
    if plan.compile_backend:
        compile_decoder_layers(model, backend=plan.compile_backend)
    if plan.loss == "full-logits":
        return loss_fn
    head = defer_lm_head(model)
    return liger_loss_for(head) if plan.loss.startswith("liger") else chunked_loss_for(head)


def apply_run_kernels(built, run) -> KernelPlan:
    """The Trainer's one call: choose from the run config, apply to `built` (a ParallelModel) in
    place (module and loss_fn), and move the module to this rank's GPU so that the optimizer can be
    torch's fused AdamW (DeepSpeed would move it there anyway)."""
    on_cuda = torch.cuda.is_available()
    plan = choose_kernels(mode=run.train.kernels, on_cuda=on_cuda, precision=run.precision, tensor=run.parallel.tensor,
                          pipeline=run.parallel.pipeline, zero_stage=run.parallel.zero_stage,
                          compile_backend=run.train.compile_backend if run.train.compile else None)
    built.loss_fn = apply_kernels(built.module, plan, loss_fn=built.loss_fn)
    if on_cuda:
        built.module.to(torch.device("cuda", torch.cuda.current_device()))
    return plan


def validate_kernel_options(*, kernels: str, compile: bool, compile_backend: str, tensor: int, pipeline: int,
                            zero_stage: int) -> None:
    """Run-config checks (before any process group): ConfigError naming the key and what to do."""
    if kernels not in KERNEL_MODES:
        raise ConfigError(f"train.kernels must be one of {', '.join(KERNEL_MODES)}, got {kernels!r}")
    if compile_backend not in COMPILE_BACKENDS:
        raise ConfigError(f"train.compile_backend must be one of {', '.join(COMPILE_BACKENDS)}, got {compile_backend!r}")
    if compile and (tensor > 1 or pipeline > 1 or zero_stage == 3):
        raise ConfigError(f"train.compile with parallel.tensor = {tensor}, pipeline = {pipeline}, zero_stage = {zero_stage}: "
                          "compiling is supported for tensor 1, pipeline 1 and ZeRO 0-2 only; set train.compile: false "
                          "for this layout")
