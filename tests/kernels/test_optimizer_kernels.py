"""build_optimizer: per-tensor AdamW (foreach=False) on CPU, torch's fused AdamW when the parameters
are on CUDA; both keep the no-decay-on-norms groups and the finite-step guard."""

import dataclasses

import pytest
import torch

from megamobi.model import MobiLlama
from megamobi.model_config import load_model_config
from megamobi.training.optimizer import FiniteStepAdamW, build_optimizer
from megamobi.training.run_config import OptimizerConfig

CONFIG = dataclasses.replace(load_model_config("tiny"), num_layers=2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="fused AdamW needs CUDA (bench/gpu_check.sh)")


def model_on(device):
    torch.manual_seed(0)
    return MobiLlama(CONFIG).to(device)


def check_groups(optimizer, model):
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() >= 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_cpu_optimizer_is_per_tensor_adamw_with_no_decay_on_norms():
    model = model_on("cpu")
    optimizer = build_optimizer(model, OptimizerConfig(weight_decay=0.1))
    assert isinstance(optimizer, FiniteStepAdamW)
    assert all(g["foreach"] is False and not g["fused"] for g in optimizer.param_groups)
    check_groups(optimizer, model)


def test_cpu_step_is_torch_adamw_and_a_non_finite_gradient_is_refused():
    model, reference = model_on("cpu"), model_on("cpu")
    ours = build_optimizer(model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    theirs = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.dim() >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.dim() < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for m in (model, reference):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.5)
    ours.step()
    theirs.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in model.parameters()]
    next(model.parameters()).grad[0] = float("nan")
    ours.step()
    assert ours.last_step_skipped and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_cuda
def test_cuda_optimizer_is_fused_and_steps_like_the_per_tensor_one():
    fused_model, plain_model = model_on("cuda"), model_on("cuda")
    fused = build_optimizer(fused_model, OptimizerConfig(lr=1e-2, weight_decay=0.1))
    assert all(g["fused"] for g in fused.param_groups)
    check_groups(fused, fused_model)
    plain = FiniteStepAdamW([{"params": [p for p in plain_model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in plain_model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for _ in range(3):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    next(fused_model.parameters()).grad[0] = float("inf")
    before = [p.detach().clone() for p in fused_model.parameters()]
    fused.step()
    assert fused.last_step_skipped and all(torch.equal(a, b) for a, b in zip(before, fused_model.parameters()))
