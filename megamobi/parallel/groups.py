"""The one owner of megamobi's process groups.

Ranks are laid out as Megatron (and DeepSpeed's PipeModelDataParallelTopology) lay them out, tensor
innermost, then data, then pipeline:

    rank = tensor_rank + T * (data_rank + D * pipeline_rank)

so the T ranks of a tensor-parallel group sit on one node and talk over NVLink. The shared-FFN tie
group is the whole pipeline group: every pipeline stage holds a replica of MobiLlama's one FFN.

A `ParallelGroups` is built once after `torch.distributed` is initialised and passed to whoever
needs a group; nothing in megamobi keeps groups in module globals. It also answers DeepSpeed's
`mpu` protocol (get_model_parallel_*, get_data_parallel_*), so DeepSpeed reduces gradients over
the data-parallel group only and computes the gradient norm over the model-parallel group.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist

from megamobi.config_io import ConfigError


@dataclasses.dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    @classmethod
    def for_world(cls, *, world_size: int, tensor: int, pipeline: int) -> Layout:
        if tensor < 1 or pipeline < 1:
            raise ConfigError(f"parallel.tensor and parallel.pipeline must be >= 1, got {tensor} and {pipeline}")
        if world_size % (tensor * pipeline):
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor x pipeline = {tensor} x {pipeline}; "
                f"launch a multiple of {tensor * pipeline} processes or change parallel.tensor/pipeline"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=world_size // (tensor * pipeline))

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(tensor_rank, data_rank, pipeline_rank) of a global rank."""
        return rank % self.tensor, (rank // self.tensor) % self.data, rank // (self.tensor * self.data)

    def rank_of(self, *, tensor: int, data: int, pipeline: int) -> int:
        return tensor + self.tensor * (data + self.data * pipeline)


class ParallelGroups:
    """Tensor, data, pipeline and model-parallel groups of the current process, from one Layout."""

    def __init__(self, layout: Layout):
        if not dist.is_initialized():
            raise RuntimeError("initialise torch.distributed before building ParallelGroups")
        if dist.get_world_size() != layout.world_size:
            raise ConfigError(f"layout {layout} needs {layout.world_size} processes, but {dist.get_world_size()} were launched")
        self.layout = layout
        self.rank = dist.get_rank()
        self.tensor_rank, self.data_rank, self.pipeline_rank = layout.coordinates(self.rank)
        T, D, P = layout.tensor, layout.data, layout.pipeline
        # Every process must create every group, in the same order, even those it is not in.
        self.tensor_group = self._new_groups(
            [[layout.rank_of(tensor=t, data=d, pipeline=p) for t in range(T)] for p in range(P) for d in range(D)])
        self.data_group = self._new_groups(
            [[layout.rank_of(tensor=t, data=d, pipeline=p) for d in range(D)] for p in range(P) for t in range(T)])
        self.pipeline_group = self._new_groups(
            [[layout.rank_of(tensor=t, data=d, pipeline=p) for p in range(P)] for d in range(D) for t in range(T)])
        # Model parallel = everything that holds a different part of one model replica (tensor x pipeline).
        self.model_group = self._new_groups(
            [[layout.rank_of(tensor=t, data=d, pipeline=p) for p in range(P) for t in range(T)] for d in range(D)])

    def _new_groups(self, rank_lists: list[list[int]]):
        mine = None
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    @property
    def shared_ffn_tie_group(self):
        """The stages that each hold a replica of the shared FFN: all of them."""
        return self.pipeline_group

    @property
    def is_first_stage(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pipeline_rank == self.layout.pipeline - 1

    # --- DeepSpeed's mpu protocol -------------------------------------------------------------
    def get_model_parallel_rank(self) -> int:
        return self.tensor_rank + self.layout.tensor * self.pipeline_rank

    def get_model_parallel_world_size(self) -> int:
        return self.layout.tensor * self.layout.pipeline

    def get_model_parallel_group(self):
        return self.model_group

    def get_data_parallel_rank(self) -> int:
        return self.data_rank

    def get_data_parallel_world_size(self) -> int:
        return self.layout.data

    def get_data_parallel_group(self):
        return self.data_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tensor_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.layout.tensor

    def get_tensor_model_parallel_group(self):
        return self.tensor_group
