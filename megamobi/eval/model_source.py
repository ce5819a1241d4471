"""What `--checkpoint` points at, turned into a Hugging Face directory that lm-eval's `hf` model reads.

A megamobi checkpoint (any TP/PP layout) is exported ONCE with megamobi.convert.to_hf into a cache
directory next to it, `<checkpoints>/.hf-eval/<step_name>/` (hidden, so checkpoint listings and resume
never see it), in fp32, the precision of the training master weights. The cache records the sha256
of the checkpoint's manifest and of the tokenizer; a checkpoint or tokenizer that changed is
re-exported. Why export instead of a `megamobi` lm-eval model class: docs/eval.md.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamobi.checkpointing.manifest import MANIFEST_NAME, checkpoint_model_config, read_manifest
from megamobi.checkpointing.recorded_paths import training_tokenizer
from megamobi.checkpointing.verified import broken_checkpoint
from megamobi.files import sha256_file, write_json_atomic

CACHE_DIR_NAME = ".hf-eval"
CACHE_STAMP = "megamobi-eval-source.json"


class EvalError(ValueError):
    """A user mistake or unusable input: printed as one line, exit status 2, no traceback."""


@dataclass
class ModelSource:
    path: Path                 # what the user passed
    kind: str                  # "megamobi" or "hf"
    hf_dir: Path               # the directory lm-eval loads
    provenance: dict[str, Any] = field(default_factory=dict)
    params: int | None = None  # unique parameters (the shared FFN counted once)
    exported: bool = False     # this call wrote hf_dir (False: reused the cache, or an HF dir given)


def is_megamobi_checkpoint(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def default_cache_dir(checkpoint: Path) -> Path:
    return checkpoint.resolve().parent / CACHE_DIR_NAME / checkpoint.resolve().name


def check_model_path(path: Path, *, tokenizer: str | Path | None) -> str:
    """"megamobi" or "hf", or an EvalError saying what is wrong; reads only small files."""
    if not path.exists():
        raise EvalError(f"--checkpoint {path}: no such directory")
    if not path.is_dir():
        raise EvalError(f"--checkpoint {path}: is a file; pass a checkpoint directory (RUN_DIR/checkpoints/step_*) "
                        "or a Hugging Face model directory")
    if is_megamobi_checkpoint(path):
        if tokenizer is None and training_tokenizer(_manifest(path)) is None:
            raise EvalError(f"--checkpoint {path}: its training data names no tokenizer file that still exists; "
                            "pass --tokenizer FILE.model (the SentencePiece model the data was made with)")
        return "megamobi"
    if (path / "config.json").is_file():
        return "hf"
    raise EvalError(f"--checkpoint {path}: neither a megamobi checkpoint (no {MANIFEST_NAME}) nor a Hugging Face "
                    "model directory (no config.json)")


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return read_manifest(path)
    except json.JSONDecodeError as err:
        raise EvalError(f"{path / MANIFEST_NAME}: unreadable checkpoint manifest: {err}") from err


def resolve_model(checkpoint: str | Path, *, tokenizer: str | Path | None = None,
                  cache_dir: str | Path | None = None, progress: bool = True) -> ModelSource:
    path = Path(checkpoint)
    if check_model_path(path, tokenizer=tokenizer) == "megamobi":
        return _from_megamobi(path, tokenizer=tokenizer, cache_dir=cache_dir, progress=progress)
    return _from_hf_dir(path)


def _from_hf_dir(path: Path) -> ModelSource:
    provenance: dict[str, Any] = {"path": str(path.resolve()), "kind": "hf"}
    stamp = path / CACHE_STAMP  # an earlier megamobi.eval export keeps its provenance
    if stamp.is_file():
        provenance.update(json.loads(stamp.read_text()).get("provenance", {}))
    return ModelSource(path=path, kind="hf", hf_dir=path, provenance=provenance, params=provenance.get("params_unique"))


def _from_megamobi(path: Path, *, tokenizer, cache_dir, progress: bool) -> ModelSource:
    from megamobi.config_io import ConfigError
    from megamobi.convert.errors import ConversionError
    from megamobi.convert.to_hf import export_hf
    from megamobi.model import parameter_counts

    try:
        manifest = read_manifest(path)
        config = checkpoint_model_config(path)
    except (json.JSONDecodeError, KeyError, ConfigError, ValueError) as err:
        raise EvalError(f"{path / MANIFEST_NAME}: unreadable checkpoint manifest: {err}") from err
    if tokenizer is not None:
        tokenizer = Path(tokenizer)
        if not tokenizer.is_file():
            raise EvalError(f"--tokenizer {tokenizer}: no such file (the SentencePiece .model the data was made with)")
    else:
        tokenizer = training_tokenizer(manifest)
        if tokenizer is None:
            raise EvalError(f"--checkpoint {path}: its training data names no tokenizer file that still exists; "
                            "pass --tokenizer FILE.model (the SentencePiece model the data was made with)")
    # Every file against the manifest's sha256 before anything is read, even when an export is cached: a
    # checkpoint damaged since is refused (one line with the --verify advice; the sweep skips it).
    broken = broken_checkpoint(path, use="evaluate")
    if broken:
        raise EvalError(broken)
    params = parameter_counts(config)["params_unique"]
    provenance = {
        "path": str(path.resolve()), "kind": "megamobi", "model_name": config.name,
        "step": manifest.get("step"), "consumed_tokens": manifest.get("consumed_tokens"),
        "consumed_samples": manifest.get("consumed_samples"), "train_loss": manifest.get("loss"),
        "code_version": manifest.get("code_version"), "manifest_sha256": sha256_file(path / MANIFEST_NAME),
        "tokenizer": str(tokenizer), "tokenizer_sha256": sha256_file(tokenizer), "params_unique": params,
    }
    hf_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(path)
    if hf_dir.exists() and not hf_dir.is_dir():
        raise EvalError(f"--cache-dir {hf_dir}: is a file; pass a directory")
    key = {k: provenance[k] for k in ("manifest_sha256", "tokenizer_sha256")}
    stamp = hf_dir / CACHE_STAMP
    if stamp.is_file():
        try:
            cached = json.loads(stamp.read_text())
        except json.JSONDecodeError:
            cached = {}
        if cached.get("key") == key:
            return ModelSource(path=path, kind="megamobi", hf_dir=hf_dir, provenance=provenance, params=params)
    # Export to a temporary sibling, then rename: an interrupted export never looks like a cache hit.
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        export_hf(path, tmp, dtype="fp32", tokenizer=tokenizer, overwrite=True, progress=progress, verified=True)
    except ConversionError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EvalError(str(err)) from err
    write_json_atomic(tmp / CACHE_STAMP, {"key": key, "provenance": provenance})
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    tmp.rename(hf_dir)
    return ModelSource(path=path, kind="megamobi", hf_dir=hf_dir, provenance=provenance, params=params, exported=True)
