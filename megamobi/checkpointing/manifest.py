"""`megamobi.json` in every checkpoint: what the checkpoint is, where it came from, and whether it is whole.

A checkpoint counts as complete only once this file exists, and it is written last (atomically),
with the sha256 of every other file in the directory: a checkpoint cut short by `kill -9` or a
full disk has no manifest or fails its checksums, and resume skips it for the previous one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megamobi.config_io import from_dict
from megamobi.files import sha256_file, write_json_atomic
from megamobi.model_config import ModelConfig
from megamobi.version import code_version

MANIFEST_NAME = "megamobi.json"
FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"  # RUN_DIR/checkpoints/step_0000123/


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run with a manifest, oldest first (not yet checksum-verified)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / MANIFEST_NAME).is_file())


def _payload_files(checkpoint_dir: Path) -> list[Path]:
    return sorted(p for p in checkpoint_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not p.name.endswith(".tmp"))


def write_manifest(checkpoint_dir: str | Path, *, model_config: ModelConfig, info: dict[str, Any]) -> dict[str, Any]:
    """Seal a checkpoint directory whose payload files are all written. `info`: step, consumed
    samples/tokens, loss, layout, run config, data manifest checksum, ... (JSON-able)."""
    checkpoint_dir = Path(checkpoint_dir)
    manifest = {
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "model_config": dict(model_config.__dict__),
        **info,
        "files": {str(p.relative_to(checkpoint_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                  for p in _payload_files(checkpoint_dir)},
    }
    write_json_atomic(checkpoint_dir / MANIFEST_NAME, manifest)
    return manifest


def read_manifest(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: no {MANIFEST_NAME}: not a megamobi checkpoint, or it was never completed")
    return json.loads(path.read_text())


def checkpoint_model_config(checkpoint_dir: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, read_manifest(checkpoint_dir)["model_config"], where=f"{checkpoint_dir}/{MANIFEST_NAME}: model_config")


def verify_checkpoint(checkpoint_dir: str | Path) -> list[str]:
    """Problems found (empty when the checkpoint is whole): missing manifest, files missing or changed."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        manifest = read_manifest(checkpoint_dir)
    except (FileNotFoundError, json.JSONDecodeError) as err:
        return [str(err)]
    problems = []
    for name, expected in manifest["files"].items():
        path = checkpoint_dir / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']}")
        elif sha256_file(path) != expected["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems
