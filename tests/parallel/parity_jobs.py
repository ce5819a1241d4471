"""Training runs for the parity tests: a single-process reference of the plain model, and the same
run under a (tensor, pipeline, data) layout with DeepSpeed, on the ranks of a fork-harness job.

Both sides see the same global batch per step (deterministic from a seed), the same initial weights
(seed), AdamW and gradient clipping. Results come back as numpy (torch tensors cannot cross the
harness's queue after the child exits).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from megamobi.model import MobiLlama, language_model_loss
from megamobi.model_config import ModelConfig, load_model_config

SEED = 1234
STEPS = 5
GLOBAL_BATCH = 8
SEQ_LEN = 32
LR = 3e-3
CLIP = 1.0  # the reference grad norms are above it, so clipping is exercised
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.1
# Gradients of different layouts differ in their last bits (other reduction orders). Adam divides m
# by sqrt(v): for an element whose gradient is ~0 (an embedding row first seen at step 3) that ratio
# is rounding noise of size ~1, so with eps=1e-8 the weights drift by ~lr (3e-3) for no real reason.
# eps=1e-5 keeps such elements' updates proportional to their tiny gradients.
ADAM_EPS = 1e-5


def tiny_config(*, num_layers: int, vocab_size: int = 1001, ffn_sharing: str = "shared") -> ModelConfig:
    """configs/tiny.yaml made smaller; vocab 1001 is odd, so T=2 pads the vocabulary."""
    return dataclasses.replace(load_model_config("tiny"), num_layers=num_layers, vocab_size=vocab_size,
                               max_seq_len=64, ffn_sharing=ffn_sharing)


def batch(config: ModelConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED * 1000 + step)
    tokens = torch.randint(0, config.vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)


def reference_run(config: ModelConfig, *, steps: int = STEPS) -> dict:
    torch.manual_seed(SEED)
    model = MobiLlama(config)
    opt = _optimizer(model.parameters())
    losses, norms, first_grads = [], [], None
    for step in range(steps):
        inputs, labels = batch(config, step)
        loss = language_model_loss(model(inputs), labels)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {k: p.grad.detach().clone().numpy() for k, p in model.named_parameters()}
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        losses.append(loss.item())
    final = {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}
    return {"losses": losses, "norms": norms, "first_grads": first_grads, "final": final}


def _ds_config(*, micro: int, accumulation: int, data: int, zero_stage: int) -> dict:
    return {
        "train_batch_size": micro * accumulation * data,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _replicas_identical(module, groups) -> bool:
    """True when every stage's shared-FFN replica equals stage 0's bit for bit (True on all ranks)."""
    import torch.distributed as dist

    from megamobi.parallel.pipeline import shared_ffn_replica

    replica = shared_ffn_replica(module)
    ok = torch.ones(1)
    src = groups.layout.rank_of(tensor=groups.tensor_rank, data=groups.data_rank, pipeline=0)
    for p in replica.parameters():
        ref = p.detach().clone()
        dist.broadcast(ref, src=src, group=groups.pipeline_group)
        ok *= float(torch.equal(ref, p.detach()))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _snapshot_tied_grads(engine, groups, store: dict) -> None:
    """Wrap the pipe engine's ReduceGrads instruction to record the shared FFN's gradient right
    after DeepSpeed's ReduceTiedGrads (summed over stages), averaged over the data group, full size."""
    import torch.distributed as dist
    from deepspeed.runtime.pipe import schedule
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from megamobi.parallel.pipeline import shared_ffn_replica
    from megamobi.parallel.shard_specs import parameter_shard_specs

    original = PipelineEngine._INSTRUCTION_MAP[schedule.ReduceGrads]
    specs = parameter_shard_specs(engine, groups)
    names = {id(p): n for n, p in engine.module.named_parameters()}

    def reduce_grads(self, *args, **kwargs):
        if not store:
            for p in shared_ffn_replica(self).parameters():
                grad = p.grad.detach().clone()
                dist.all_reduce(grad, group=groups.data_group)
                grad /= groups.layout.data
                spec = specs[names[id(p)]]
                if spec.split_dim is not None:
                    parts = [torch.empty_like(grad) for _ in range(groups.layout.tensor)]
                    dist.all_gather(parts, grad, group=groups.tensor_group)
                    grad = torch.cat(parts, dim=spec.split_dim)
                store[spec.full_key] = grad.numpy()
        return original(self, *args, **kwargs)

    engine._INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.ReduceGrads: reduce_grads}


def _tensor_replicas_identical(module, groups) -> bool:
    """True when every replicated (not tensor-split) parameter, e.g. a norm weight, is bit for bit
    the same on every rank of the tensor group (True on all ranks)."""
    import torch.distributed as dist

    ok = torch.ones(1)
    src = groups.layout.rank_of(tensor=0, data=groups.data_rank, pipeline=groups.pipeline_rank)
    for p in module.parameters():
        if getattr(p, "tensor_model_parallel", False):
            continue
        ref = p.detach().clone()
        dist.broadcast(ref, src=src, group=groups.tensor_group)
        ok *= float(torch.equal(ref, p.detach()))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def parallel_run(rank: int, config: ModelConfig, layout: tuple[int, int, int], partition_method: str, *,
                 steps: int = STEPS, activation_checkpointing: bool = False, sequence_parallel: bool = False,
                 zero_stage: int = 1) -> dict:
    """One layout (T, P, D) on this job's ranks; every rank returns its per-step view.
    sequence_parallel: Megatron sequence parallelism over the T ranks (T >= 2); zero_stage: 1 or 2
    (ZeRO-0 fp32 reports no grad norm; pipelines allow 1 only)."""
    import deepspeed
    import torch.distributed as dist

    from megamobi.parallel.build import build_parallel_model
    from megamobi.parallel.groups import Layout, ParallelGroups
    from megamobi.parallel.shard_specs import gather_full_state_dict

    T, P, D = layout
    groups = ParallelGroups(Layout(tensor=T, pipeline=P, data=D))
    built = build_parallel_model(config, groups, seed=SEED, partition_method=partition_method,
                                 activation_checkpointing=activation_checkpointing,
                                 sequence_parallel=sequence_parallel)
    per_replica = GLOBAL_BATCH // D
    accumulation = 2 if built.is_pipeline else 1
    ds_config = _ds_config(micro=per_replica // accumulation, accumulation=accumulation, data=D,
                           zero_stage=zero_stage)
    ds_config.update(built.ds_config_overrides)
    optimizer = _optimizer([p for p in built.module.parameters()])
    kwargs = {} if built.is_pipeline else {"mpu": groups}
    engine, *_ = deepspeed.initialize(model=built.module, optimizer=optimizer, config=ds_config, **kwargs)
    tied_grads: dict = {}
    if built.is_pipeline and config.ffn_sharing == "shared":
        _snapshot_tied_grads(engine, groups, tied_grads)

    losses, norms, replicas_ok, tensor_replicas_ok = [], [], [], []
    for step in range(steps):
        inputs, labels = batch(config, step)
        mine = slice(groups.data_rank * per_replica, (groups.data_rank + 1) * per_replica)
        inputs, labels = inputs[mine], labels[mine]
        if built.is_pipeline:
            micro = per_replica // accumulation
            micro_batches = [(inputs[i:i + micro], labels[i:i + micro]) for i in range(0, per_replica, micro)]
            loss = engine.train_batch(iter(micro_batches))
        else:
            loss = built.loss_fn(engine(inputs), labels)
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=groups.data_group)
            loss /= D
        losses.append(float(loss))
        norms.append(float(engine.get_global_grad_norm()))
        if built.is_pipeline and config.ffn_sharing == "shared":
            replicas_ok.append(_replicas_identical(engine, groups))
        if sequence_parallel:
            tensor_replicas_ok.append(_tensor_replicas_identical(engine.module, groups))
    full = gather_full_state_dict(engine, groups)
    return {
        "losses": losses,
        "norms": norms,
        "replicas_ok": replicas_ok,
        "tensor_replicas_ok": tensor_replicas_ok,
        "tied_grads": tied_grads,
        "final": None if full is None else {k: v.numpy() for k, v in full.items()},
    }


def parallel_runs(rank: int, config: ModelConfig, layouts: list[tuple[int, int, int]], partition_method: str,
                  options: list[dict] | None = None) -> list:
    """Several layouts of the same world size one after the other in one job (saves start-ups);
    options[i]: extra keyword arguments of parallel_run for layouts[i] (sequence_parallel, zero_stage)."""
    options = options or [{}] * len(layouts)
    return [parallel_run(rank, config, layout, partition_method, **opts) for layout, opts in zip(layouts, options)]


def max_abs_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)
