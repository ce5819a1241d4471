"""`megamobi.json` in every checkpoint: what the checkpoint is, where it came from, and whether it is whole.

A checkpoint counts as complete only once this file exists, and it is written last (atomically),
with the sha256 of every other file in the directory: a checkpoint cut short by `kill -9` or a
full disk has no manifest or fails its checksums, and resume skips it for the previous one.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
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


def write_manifest(checkpoint_dir: str | Path, *, model_config: ModelConfig, info: dict[str, Any],
                   digests: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Seal a checkpoint directory whose payload files are all written. `info`: step, consumed
    samples/tokens, loss, layout, run config, data manifest checksum, ... (JSON-able). `digests`:
    {file: {bytes, sha256}} hashed while written (megamobi.checkpointing.hashed_files); only the
    files it does not list are read back and hashed here."""
    checkpoint_dir = Path(checkpoint_dir)
    digests = digests or {}
    files = {}
    for path in _payload_files(checkpoint_dir):
        name = str(path.relative_to(checkpoint_dir))
        known = digests.get(name)
        if known is not None and path.stat().st_size != known["bytes"]:
            raise RuntimeError(f"{path}: {path.stat().st_size} bytes on disk, {known['bytes']} were written")
        files[name] = known or {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    missing = sorted(set(digests) - set(files))
    if missing:
        raise RuntimeError(f"{checkpoint_dir}: written but gone before the manifest: {', '.join(missing[:3])}")
    manifest = {
        "format_version": FORMAT_VERSION,
        "code_version": code_version(),
        "model_config": dict(model_config.__dict__),
        **info,
        "files": files,
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


def verify_checkpoint(checkpoint_dir: str | Path, *, share: tuple[int, int] | None = None) -> list[str]:
    """Problems found (empty when the checkpoint is whole): missing manifest, files missing or changed.
    Files are hashed by parallel threads (sha256 releases the GIL). `share=(rank, world)`: check only
    this rank's share of the bytes (see files_of_rank); the union over all ranks checks everything."""
    checkpoint_dir = Path(checkpoint_dir)
    try:
        manifest = read_manifest(checkpoint_dir)
    except FileNotFoundError as err:
        return [str(err)]
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError: damaged bytes
        return [f"{checkpoint_dir / MANIFEST_NAME}: damaged ({type(err).__name__}: {err})"]
    damage = manifest_damage(manifest)
    if damage:
        return [f"{checkpoint_dir / MANIFEST_NAME}: damaged ({damage})"]
    files = manifest["files"]
    names = list(files) if share is None else files_of_rank(files, rank=share[0], world=share[1])
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda name: _file_problem(checkpoint_dir / name, files[name]), names)
    return [problem for problem in found if problem]


def manifest_damage(manifest: Any) -> str | None:
    """What makes a manifest that parses as JSON unusable (damaged bytes that still parse), or None."""
    if not isinstance(manifest, dict):
        return f"not a JSON object but {type(manifest).__name__}"
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str) for e in files.values()):
        return "no valid `files` table of sizes and sha256"
    if isinstance(manifest.get("step"), bool) or not isinstance(manifest.get("step", 0), int):
        return f"step {manifest.get('step')!r} is not an integer"
    return None


def files_of_rank(files: dict[str, dict[str, Any]], *, rank: int, world: int) -> list[str]:
    """Rank `rank`'s share of a manifest's files for a verification spread over `world` ranks: the
    largest file first to the rank with the fewest bytes so far (the same answer on every rank)."""
    loads, shares = [0] * world, [[] for _ in range(world)]
    for name in sorted(files, key=lambda n: (-files[n]["bytes"], n)):
        lightest = loads.index(min(loads))
        shares[lightest].append(name)
        loads[lightest] += files[name]["bytes"]
    return sorted(shares[rank])


def _file_problem(path: Path, expected: dict[str, Any]) -> str | None:
    if not path.is_file():
        return f"{path}: missing"
    if path.stat().st_size != expected["bytes"]:
        return f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']}"
    if sha256_file(path, direct=True) != expected["sha256"]:
        return f"{path}: sha256 differs from the manifest"
    return None
