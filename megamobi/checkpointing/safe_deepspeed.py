"""Load DeepSpeed's checkpoint files without unpickling arbitrary code.

DeepSpeed 0.19 loads its `.pt` files with `torch.load(weights_only=False)`: a checkpoint downloaded
from anywhere could run code on load. We swap in a checkpoint engine that loads with
`weights_only=True`, allowing only the few DeepSpeed classes its files are known to contain, so a
file holding anything else is refused instead of executed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine


def _allowed_classes() -> list:
    """The non-tensor objects DeepSpeed writes into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


class SafeTorchCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_allowed_classes()):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # pickle.UnpicklingError and friends: say which file and why
                raise RuntimeError(f"{path}: refused to load (only tensors and known DeepSpeed objects are "
                                   f"allowed, never arbitrary code): {err}") from err


def use_safe_loading(engine) -> None:
    """Make `engine.load_checkpoint` (and the pipeline module's layer loading) weights-only, and its
    saves go through megamobi's checkpoint jobs (hashed while written)."""
    engine.checkpoint_engine = PlannedSaveCheckpointEngine(engine._config)
    # DeepSpeed's rank 0 copies zero_to_fp32.py into every save, a file written outside the job, between
    # two of its barriers: on a full or read-only disk it would fail there alone and leave the other
    # ranks waiting. Those scripts cannot read megamobi's checkpoints anyway (training/checkpoint.py).
    engine._copy_recovery_script = lambda save_path: None


class PlannedSaveCheckpointEngine(SafeTorchCheckpointEngine):
    """DeepSpeed's `save_checkpoint` hands each state dict to `save()`; while a CheckpointJob is set
    (megamobi.training.checkpoint.save_checkpoint) the state dict goes into the job, which writes it
    hashed while written, now or in the background. Outside a job it saves as DeepSpeed would."""

    job = None  # the CheckpointJob of the save in progress

    def save(self, state_dict, path: str):
        if self.job is None:
            return super().save(state_dict, path)
        # torch's legacy format writes each storage straight from memory; the zip format also
        # computes a CRC-32 of every byte (about 0.4 CPU-seconds per GB), which the sha256 in the
        # manifest makes redundant. torch.load reads both (weights_only included).
        self.job.add_torch(Path(path), state_dict, _use_new_zipfile_serialization=False)

    def preserves_storage_sharing(self) -> bool:
        # DeepSpeed clones tensors that are views unless told otherwise; a snapshot copies them anyway.
        return self.job is None or self.job.snapshot is None
