"""Reading a megamobi checkpoint for export: verified first, merged from any TP/PP layout."""

from __future__ import annotations

from pathlib import Path

import torch

from megamobi.checkpointing.manifest import checkpoint_model_config
from megamobi.checkpointing.model_files import read_full_model
from megamobi.checkpointing.verified import broken_checkpoint
from megamobi.config_io import ConfigError
from megamobi.convert.errors import ConversionError
from megamobi.convert.hf_keys import check_megamobi_state_dict
from megamobi.model_config import ModelConfig


def load_checkpoint(checkpoint_dir: str | Path, *, verified: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and full plain-model state dict of a checkpoint, refusing one that is incomplete or
    whose files changed since its manifest was written (a half-written checkpoint would otherwise
    export garbage that still loads). `verified`: the caller has just made that check."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise ConversionError(f"{checkpoint_dir}: checkpoint directory not found")
    latest = checkpoint_dir / "checkpoints" / "latest"
    if latest.is_file() and not (checkpoint_dir / "megamobi.json").exists():
        raise ConversionError(f"--checkpoint {checkpoint_dir}: is a run directory; give one of its checkpoints, e.g. "
                              f"{checkpoint_dir / 'checkpoints' / latest.read_text().strip()}")
    broken = None if verified else broken_checkpoint(checkpoint_dir, use="convert")
    if broken:
        raise ConversionError(broken)
    try:
        config = checkpoint_model_config(checkpoint_dir)
        state_dict = read_full_model(checkpoint_dir)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        raise ConversionError(f"{checkpoint_dir}: cannot read the checkpoint: {err}") from err
    check_megamobi_state_dict(state_dict, config, where=str(checkpoint_dir))
    return config, state_dict
