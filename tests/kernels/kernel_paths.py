"""One tiny MobiLlama run three ways on the same weights and tokens: the plain path in the run's dtype,
the same model with a kernel plan applied (megamobi.kernels.plan.apply_kernels), and a float64
reference of the plain path. Shared by the GPU tests and the Triton-interpreter tests.

    paths = run_paths(plan, config=CONFIG, dtype=torch.bfloat16, device="cuda")
    paths.assert_kernels_match_plain(rtol=1e-5)          # fp32: the same arithmetic up to rounding
    paths.assert_kernels_as_accurate_as_plain()          # bf16: each path's error against float64

Parameters are cast to the dtype and the rotary tables stay fp32, as DeepSpeed's bf16 mode holds the
model (buffers are not cast), so the kernels see what the Trainer gives them.
"""

from __future__ import annotations

import dataclasses

import torch

from megamobi.kernels.loss import IGNORE_INDEX
from megamobi.kernels.plan import KernelPlan, apply_kernels
from megamobi.model import MobiLlama, language_model_loss
from megamobi.model_config import ModelConfig


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def as_the_trainer_holds_it(model: MobiLlama, *, dtype: torch.dtype, device) -> MobiLlama:
    model.to(device)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@dataclasses.dataclass
class Path:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


def _run(model, loss_fn, tokens, labels) -> Path:
    loss = loss_fn(model(tokens), labels)
    loss.backward()
    return Path(loss.detach(), {name: p.grad for name, p in model.named_parameters()})


@dataclasses.dataclass
class Paths:
    plain: Path
    kernels: Path
    reference: Path  # float64, plain

    def assert_kernels_match_plain(self, *, rtol: float) -> None:
        assert relative_error(self.kernels.loss, self.plain.loss) <= rtol, (self.kernels.loss, self.plain.loss)
        for name, grad in self.plain.grads.items():
            err = relative_error(self.kernels.grads[name], grad)
            assert err <= rtol, (name, err)

    def assert_kernels_as_accurate_as_plain(self, *, factor: float = 1.5, floor: float = 4e-3) -> None:
        """Each path's relative error against float64: the kernels' at most `factor` times the plain
        path's, or under `floor` (bf16's unit roundoff 2^-8: rounding, whatever the plain path happened to get)."""
        def errors(name):
            ref = self.reference.grads[name] if name else self.reference.loss
            plain = self.plain.grads[name] if name else self.plain.loss
            kernels = self.kernels.grads[name] if name else self.kernels.loss
            return relative_error(kernels, ref), relative_error(plain, ref)

        for name in ["", *self.plain.grads]:
            kernel_err, plain_err = errors(name)
            assert kernel_err <= max(factor * plain_err, floor), (name or "loss", kernel_err, plain_err)


def run_paths(plan: KernelPlan, *, config: ModelConfig, dtype: torch.dtype, device="cpu", batch: int = 2,
              seq: int = 32, ignored: int = 5, seed: int = 0) -> Paths:
    """Loss and every gradient of the three paths; the first `ignored` labels are IGNORE_INDEX."""
    torch.manual_seed(seed)
    plain = as_the_trainer_holds_it(MobiLlama(config), dtype=dtype, device=device)
    kernels = as_the_trainer_holds_it(MobiLlama(config), dtype=dtype, device=device)
    kernels.load_state_dict(plain.state_dict())
    reference = MobiLlama(config).to(device, torch.float64)
    reference.load_state_dict(plain.state_dict())  # the same (rounded) weights, exactly, in float64
    loss_fn = apply_kernels(kernels, plan, loss_fn=language_model_loss)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    labels = tokens[:, 1:].clone()
    labels.view(-1)[:ignored] = IGNORE_INDEX
    inputs = tokens[:, :-1]
    return Paths(plain=_run(plain, language_model_loss, inputs, labels),
                 kernels=_run(kernels, loss_fn, inputs, labels),
                 reference=_run(reference, language_model_loss, inputs, labels))
