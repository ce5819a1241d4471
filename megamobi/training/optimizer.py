"""AdamW with the paper's weight decay on matrices only, and a guard that refuses non-finite steps."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megamobi.training.run_config import OptimizerConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (projections, embeddings); never norms (1-D), as in Llama and the paper."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class FiniteStepAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update, on every rank, when the step is bad: any rank holds a
    non-finite gradient, or the step's loss (from `guard`, megamobi/training/divergence.py) is not
    finite or is a spike, or the guard says the step was judged bad data before.

    DeepSpeed already skips non-finite steps in some modes (fp16, ZeRO 1-2 in fp32) but not in
    others (ZeRO-0, bf16 without check_grad_overflow); checking here, where every mode ends up,
    makes the rule the same everywhere. The check is one all-reduce of three numbers per step (the
    non-finite flag, the loss sum and count), before the update is applied.
    """

    def __init__(self, params, *, group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.group = group
        self.last_step_skipped = False
        self.refusal: str | None = None  # why the last update was refused
        self.guard = None  # a StepGuard, set by the trainer

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        # ZeRO-3 calls step() once per parameter sub-group, sometimes with an empty group.
        device = grads[0].device if grads else ("cuda" if torch.cuda.is_available() else "cpu")
        bad = torch.zeros((), device=device)
        if grads:  # one flag for all tensors: a single host sync per step, not one per tensor
            bad = (~torch.stack([torch.isfinite(g).all() for g in grads]).all()).float()
        guard = self.guard
        loss_sum = guard.loss_sum if guard is not None else 0.0
        stats = torch.stack([bad, torch.as_tensor(loss_sum, dtype=torch.float32, device=device).reshape(()),
                             torch.tensor(float(guard.loss_count if guard is not None else 0), device=device)])
        if dist.is_initialized():
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        flag, total, count = stats.tolist()
        loss = total / count if count else None
        if guard is not None:
            self.refusal = guard.refusal(bad_gradient=flag > 0, loss=loss)
        else:
            self.refusal = "non-finite gradient" if flag > 0 else None
        self.last_step_skipped = self.refusal is not None
        if self.last_step_skipped:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> FiniteStepAdamW:
    """On CPU: foreach=False, the same arithmetic on every layout, so parallel runs match the single
    process. With every parameter on CUDA: torch's fused AdamW (one kernel for all tensors; the same
    update rule), which also drives the fp32 master partitions DeepSpeed's ZeRO puts in its place."""
    groups = parameter_groups(model, config.weight_decay)
    on_cuda = all(p.is_cuda for group in groups for p in group["params"])
    kernel = {"fused": True} if on_cuda and groups[0]["params"] else {"foreach": False}
    return FiniteStepAdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                           weight_decay=config.weight_decay, **kernel)
