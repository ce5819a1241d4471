"""Silent data corruption: do the replicas of every replicated tensor still agree?

Every train.consistency_check_interval steps (and before every checkpoint save) each rank computes a
checksum of each tensor some other rank also holds: under ZeRO 0-2 every data-parallel replica holds
the whole model; each pipeline stage holds a replica of the shared FFN; tensor-parallel ranks share
the norms; under ZeRO-0 the AdamW moments are replicated too. A replica is named by its plain-model
key (and its tensor-parallel slice), so the same rule covers every layout. The checksums (two integer
sums of the tensor's raw bits, one position-weighted: any single flipped bit changes them) are
exchanged once per check, a few kB per rank.

A tensor whose copies differ names the ranks that differ from the majority. With two copies there is
no majority: the run rewinds anyway (megamobi/training/recovery.py), re-runs to the same step, and
the rank whose copy changed between the two passes is the corrupted one (exact when the check runs
in the step the corruption happened; later steps spread it through the gradients to every copy).
ZeRO-3 partitions the parameters instead of replicating them: nothing to compare.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import torch
import torch.distributed as dist

from megamobi.parallel.groups import ParallelGroups
from megamobi.parallel.pipeline import unwrap
from megamobi.parallel.shard_specs import parameter_shard_specs

_CHUNK = 1 << 24  # elements per pass: bounded temporary memory on the device
_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


@torch.no_grad()
def tensor_checksum(tensor: torch.Tensor) -> tuple[int, int]:
    """(sum, position-weighted sum) of the tensor's raw bits as integers, wrapping at 2**64."""
    bits = tensor.detach().contiguous().reshape(-1).view(_INT_VIEW[tensor.element_size()])
    plain = torch.zeros((), dtype=torch.int64, device=bits.device)
    weighted = torch.zeros((), dtype=torch.int64, device=bits.device)
    for start in range(0, bits.numel(), _CHUNK):
        part = bits[start:start + _CHUNK].to(torch.int64)
        positions = torch.arange(start, start + part.numel(), device=bits.device, dtype=torch.int64)
        plain += part.sum()
        weighted += (part * (positions % 65521 + 1)).sum()
    return int(plain), int(weighted)


@dataclasses.dataclass
class Mismatch:
    step: int
    tensors: list[str]  # replica names whose copies differ
    ranks: list[int]  # ranks that differ from the majority (every holder when there is none)
    majority: bool  # False: some tensor had no majority (two copies, or a tie)


def flip_one_bit(tensor: torch.Tensor) -> None:
    """Flip the top mantissa bit of the tensor's first element: a changed but finite value (silent)."""
    bit = {torch.float32: 22, torch.bfloat16: 6, torch.float16: 9, torch.float64: 51}[tensor.dtype]
    element = tensor.detach().view(-1)[:1].view(_INT_VIEW[tensor.element_size()])
    element.bitwise_xor_(1 << bit)


class ReplicaCheck:
    """Built once (collective: it learns which ranks hold which replica); `check()` is collective too."""

    def __init__(self, engine, groups: ParallelGroups, *, zero_stage: int):
        self.enabled = zero_stage <= 2
        self.engine, self.zero_stage = engine, zero_stage
        module = unwrap(engine)
        specs = parameter_shard_specs(module, groups)
        self.params: dict[str, torch.Tensor] = {}
        for name, param in module.named_parameters():
            spec = specs[name]
            key = spec.full_key if spec.split_dim is None else f"{spec.full_key}[tensor slice {groups.tensor_rank}]"
            self.params.setdefault(key, param)  # a module reached twice (tied) is one replica here
        holders: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(holders, sorted(self.params))
        counts = Counter(name for names in holders for name in names)
        self.replicated = [name for name in self.params if counts[name] > 1]
        self._first_pass: dict[str, tuple[int, int]] = {}

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The replicated parameters, and under ZeRO-0 their AdamW moments (created at the first step)."""
        tensors = {name: self.params[name] for name in self.replicated}
        if self.zero_stage == 0:
            state = self.engine.optimizer.state
            for name in self.replicated:
                for moment, value in state.get(self.params[name], {}).items():
                    if torch.is_tensor(value) and value.dim() > 0:
                        tensors[f"{name} (AdamW {moment})"] = value
        return tensors

    def flip_target(self) -> tuple[str, torch.Tensor] | None:
        """The first replicated parameter of this rank (what the `flip` fault corrupts); none under ZeRO-3."""
        return (self.replicated[0], self.params[self.replicated[0]]) if self.enabled and self.replicated else None

    def checksums(self) -> dict[str, tuple[int, int]]:
        return {name: tensor_checksum(tensor) for name, tensor in self._tensors().items()}

    def check(self, *, step: int) -> Mismatch | None:
        """Compare every replicated tensor across its holders; the same answer on every rank."""
        mine = self.checksums()
        everyone: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
        copies: dict[str, dict[int, tuple[int, int]]] = {}
        for rank, sums in enumerate(everyone):
            for name, value in sums.items():
                copies.setdefault(name, {})[rank] = tuple(value)
        bad_tensors, odd, majority = [], set(), True
        for name, by_rank in sorted(copies.items()):
            values = Counter(by_rank.values())
            if len(values) == 1:
                continue
            bad_tensors.append(name)
            top, count = values.most_common(1)[0]
            if count * 2 > len(by_rank):
                odd.update(r for r, v in by_rank.items() if v != top)
            else:
                majority = False
                odd.update(by_rank)
        if not bad_tensors:
            return None
        self._first_pass = {name: mine[name] for name in bad_tensors if name in mine}
        return Mismatch(step=step, tensors=bad_tensors, ranks=sorted(odd), majority=majority)

    def changed_since_first_pass(self) -> list[int]:
        """After a rewind and re-run to the step of a mismatch: the ranks whose copies of the tensors
        that differed are not what they were in the first pass (collective)."""
        now = self._tensors()
        changed = any(tensor_checksum(now[name]) != value for name, value in self._first_pass.items())
        flags: list[bool] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(flags, changed)
        self._first_pass = {}
        return [rank for rank, flag in enumerate(flags) if flag]
