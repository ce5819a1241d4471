"""The training state in plain-model terms, so a checkpoint can resume under ANY layout.

DeepSpeed's own files are tied to the layout that wrote them (ZeRO partitions of flat buffers, one
file per model-parallel rank). Beside them every checkpoint holds, keyed by the plain model's
state-dict names and merged the same way as the weights (megamobi.checkpointing.model_files):

    model/tp{T}-pp{P}.safetensors        fp32 master weights
    optimizer/tp{T}-pp{P}.safetensors    AdamW's exp_avg and exp_avg_sq ("<key>:exp_avg", ...)

and the AdamW step count in trainer_state.json. Resuming with another (T, P, D, ZeRO stage) loads
the weights into the freshly built model before DeepSpeed wraps it, takes one optimizer step with
zero gradients and learning rate 0 so that DeepSpeed creates its partitioned optimizer state, then
overwrites that state (and the fp32 master weights) with the saved values.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from megamobi.checkpointing.checkpoint_job import CheckpointJob
from megamobi.checkpointing.model_files import (
    MODEL_DIR,
    TensorShard,
    read_full_tensors,
    shard_file_name,
    shard_metadata,
)
from megamobi.parallel.groups import ParallelGroups
from megamobi.parallel.shard_specs import parameter_shard_specs
from megamobi.parallel.tensor_parallel import _local_slice

ADAM_STATES = ("exp_avg", "exp_avg_sq")
OPTIMIZER_DIR = "optimizer"


def _whole_fragment(param: torch.nn.Parameter, key: str | None = None) -> torch.Tensor | None:
    """Under ZeRO-1/2 with one data-parallel rank, the optimizer's flat fp32 partition holds the
    whole parameter: a view of it (no new memory, no all-reduce), else None."""
    mapping = getattr(param, "_hp_mapping", None)
    if (mapping is None or dist.get_world_size(group=param._dp_group) != 1
            or mapping.lp_fragment_address.numel != param.numel()):
        return None
    return mapping.get_hp_fragment(key).view(param.shape)


def _full_weight(param: torch.nn.Parameter) -> tuple[torch.Tensor, bool]:
    """(fp32 weight on the CPU, whether it is a new tensor rather than the live state)."""
    whole = _whole_fragment(param)
    if whole is not None:
        return whole.cpu(), False
    full = safe_get_full_fp32_param(param)  # collective over the data-parallel group under ZeRO: a new tensor
    return (param.detach().float() if full is None else full).cpu(), full is not None


def _full_state(param: torch.nn.Parameter, key: str, *, optimizer: torch.optim.Optimizer) -> tuple[torch.Tensor, bool]:
    whole = _whole_fragment(param, key)
    if whole is not None:
        return whole.cpu(), False
    full = safe_get_full_optimizer_state(param, key)  # collective under ZeRO: a new tensor
    if full is None:  # ZeRO-0 (fp32 only): the torch optimizer holds the model's own parameters
        state = optimizer.state.get(param, {})
        return (state[key] if key in state else torch.zeros_like(param, dtype=torch.float32)).detach().float().cpu(), False
    return full.detach().float().cpu(), True


def _link_optimizer_state(engine) -> None:
    """DeepSpeed's ZeRO-1/2 optimizer links each parameter to its slice of AdamW's state right after
    the FIRST parameter group's first step, when the other groups (ours: no-decay norms) have no
    state yet, and never again. Link again now that every group has state."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW parameters disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0


def write_portable_state(*, engine, groups: ParallelGroups, optimizer: torch.optim.Optimizer, checkpoint_dir: Path,
                         job: CheckpointJob) -> None:
    """Collective: every rank calls it; data-rank-0 ranks add one file each per kind to `job`."""
    _link_optimizer_state(engine)
    fresh = True  # every tensor gathered anew (ZeRO); False when some are the live ones (ZeRO-0)
    specs = parameter_shard_specs(engine.module, groups)
    weights: dict[str, torch.Tensor] = {}
    states: dict[str, torch.Tensor] = {}
    weight_shards: dict[str, TensorShard] = {}
    state_shards: dict[str, TensorShard] = {}
    for name, param in engine.module.named_parameters():
        weight, new = _full_weight(param)
        moments = {}
        for key in ADAM_STATES:
            moments[key], new_state = _full_state(param, key, optimizer=optimizer)
            new = new and new_state
        fresh = fresh and new
        spec = specs[name]
        # One copy of everything: data rank 0 writes, tensor rank 0 writes what is not split,
        # pipeline stage 0 writes the shared FFN (the other stages hold replicas).
        if groups.data_rank != 0 or spec.is_replica or (spec.split_dim is None and groups.tensor_rank != 0):
            continue
        shard = TensorShard(split_dim=spec.split_dim, tensor_rank=groups.tensor_rank,
                            tensor_size=groups.layout.tensor, full_size=spec.full_size)
        weights[spec.full_key] = weight
        weight_shards[spec.full_key] = shard
        for key, value in moments.items():
            states[f"{spec.full_key}:{key}"] = value
            state_shards[f"{spec.full_key}:{key}"] = shard
    if groups.data_rank == 0:
        file = shard_file_name(tensor_rank=groups.tensor_rank, pipeline_rank=groups.pipeline_rank)
        for folder, tensors, shards in ((MODEL_DIR, weights, weight_shards), (OPTIMIZER_DIR, states, state_shards)):
            job.add_safetensors(checkpoint_dir / folder / file, tensors,
                                metadata=shard_metadata(tensors=tensors, shards=shards), private=fresh)


def _local(full: torch.Tensor, *, spec, groups: ParallelGroups) -> torch.Tensor:
    if spec.split_dim is None:
        return full
    return _local_slice(full, dim=spec.split_dim, rank=groups.tensor_rank, world=groups.layout.tensor)


@torch.no_grad()
def load_portable_optimizer_state(*, engine, groups: ParallelGroups, optimizer: torch.optim.Optimizer,
                                  checkpoint_dir: Path, step: int) -> None:
    """After `prime_optimizer_state`: restore the fp32 master weights and AdamW's moments and step."""
    _link_optimizer_state(engine)
    weights = read_full_tensors(checkpoint_dir, MODEL_DIR)
    states = read_full_tensors(checkpoint_dir, OPTIMIZER_DIR)
    specs = parameter_shard_specs(engine.module, groups)
    for name, param in engine.module.named_parameters():
        spec = specs[name]
        weight = _local(weights[spec.full_key], spec=spec, groups=groups).to(param.device)
        safe_set_full_fp32_param(param, weight)
        for key in ADAM_STATES:
            value = _local(states[f"{spec.full_key}:{key}"], spec=spec, groups=groups).to(param.device)
            if hasattr(param, "_hp_mapping") or hasattr(param, "ds_id"):
                safe_set_full_optimizer_state(param, value, key)
            else:
                optimizer.state[param][key].copy_(value)
    for state in optimizer.state.values():
        if "step" in state:
            state["step"].fill_(step) if torch.is_tensor(state["step"]) else state.__setitem__("step", step)
