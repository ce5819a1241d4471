"""Helpers of the data tests: English text, input writers, and a runner for the real data_tools scripts."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from megamobi.data.indexed_format import SEQ_LEN

REPO_ROOT = Path(__file__).resolve().parents[2]


def english_text() -> list[str]:
    """Docstrings of a few stdlib modules: English-ish text available offline."""
    import argparse
    import collections
    import json as json_module
    import logging
    import pathlib
    import subprocess as sp
    import unittest

    docs = []
    for module in (argparse, collections, json_module, logging, pathlib, sp, unittest):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                docs.append(doc)
    return docs


def amber_rows(n: int, *, seed: int = 0, sources=("c4", "arxiv", "book")) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"token_ids": rng.integers(0, 32000, SEQ_LEN).tolist(), "source": sources[i % len(sources)]}
            for i in range(n)]


def write_lines(path: Path, lines: list[str | bytes], *, compression: str | None = None) -> Path:
    data = b"".join((l if isinstance(l, bytes) else l.encode()) + b"\n" for l in lines)
    if compression == "gzip":
        data = gzip.compress(data)
    elif compression == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def write_amber(path: Path, rows: list[dict], *, compression: str | None = None) -> Path:
    return write_lines(path, [json.dumps(r) for r in rows], compression=compression)


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run data_tools/<script> exactly as a user would (no package install, from the repo root)."""
    return subprocess.run([sys.executable, f"data_tools/{script}", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("shard_*"))}


def shard_file(directory: Path, k: int, suffix: str = "bin") -> Path:
    """The file of the k-th shard listed in `directory`'s manifest (names follow the input chunks)."""
    name = json.loads((Path(directory) / "manifest.json").read_text())["shards"][k]["name"]
    return Path(directory) / f"{name}.{suffix}"
