"""Paths a checkpoint recorded, found again from any directory.

A run config's `data.paths` are kept as the user wrote them, often relative to the directory the
run was launched from; every checkpoint records that directory (`launch_dir` in megamobi.json). The
tools that read a run later (replay, eval, convert, evaluate) may run elsewhere: a relative path is
looked up from the current directory first, then from the recorded launch directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megamobi.files import sha256_file

LAUNCH_DIR_KEY = "launch_dir"


def launch_dir_record() -> dict[str, str]:
    """What the trainer adds to every checkpoint manifest."""
    return {LAUNCH_DIR_KEY: os.getcwd()}


def resolve_recorded(path: str | Path, *, launch_dir: str | None) -> Path:
    """`path` as recorded -> the path that exists from here (unchanged when neither exists)."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not launch_dir:
        return path
    candidate = Path(launch_dir) / path
    return candidate if candidate.exists() else path


def where_to_run(path: str | Path, *, launch_dir: str | None) -> str:
    """The end of a 'not found' message: where the path was looked for and what to do."""
    if Path(path).is_absolute():
        return "it was moved or deleted since the run recorded it"
    if launch_dir:
        return (f"looked for from {os.getcwd()} and from the run's launch directory {launch_dir}; it was moved or "
                "deleted since")
    return (f"relative paths are read from the current directory ({os.getcwd()}); run this from the directory the "
            "training was launched in")


def recorded_data_paths(manifest: dict[str, Any]) -> list[Path]:
    """The data.paths of a checkpoint's run config, resolved as above ([] when it records none)."""
    paths = ((manifest.get("run_config") or {}).get("data") or {}).get("paths") or []
    return [resolve_recorded(p, launch_dir=manifest.get(LAUNCH_DIR_KEY)) for p in paths]


def training_tokenizer(manifest: dict[str, Any]) -> Path | None:
    """The SentencePiece model the checkpoint's training shards were made with, when the shards'
    manifest.json names one that still exists with the same sha256 (text data; Amber data was
    tokenized elsewhere and names none)."""
    for data_dir in recorded_data_paths(manifest):
        try:
            info = json.loads((data_dir / "manifest.json").read_text()).get("tokenizer") or {}
        except (OSError, ValueError, AttributeError):
            continue
        path = Path(info["path"]) if info.get("path") else None
        if path is not None and path.is_file() and (not info.get("sha256") or sha256_file(path) == info["sha256"]):
            return path
    return None
