"""Cheap content fingerprints of a shard directory, and the full check of its bytes (`--verify-shards`).

A checkpoint records, for every data directory the run reads, each shard file's size and the sha256
of BLOCKS fixed blocks of BLOCK_BYTES spread evenly over it (the first, the last, the middle and 14
between); a file no larger than those blocks together is hashed whole. A resume recomputes them
(megamobi/training/stage_checks.py): a shard rewritten in place with the same size (re-tokenized,
damaged, copied over from another build) differs in its sampled blocks unless the change falls
wholly between them. The cost is fixed per file: at the paper's scale (360 shards, 2.5 TB, three
files each) 1,080 files x 17 reads of 4 KiB, about 75 MB, once per process start (not per
checkpoint: the fingerprints taken at start are what every checkpoint of that start records).

Every byte is checked only with `python -m megamobi.pretrain --verify-shards` (or
`megamobi.replay --verify-shards`): each shard file's sha256 against its directory's manifest.json,
whose own sha256 every checkpoint records and every resume compares, so the chain reaches the
bytes the checkpoint trained on.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from megamobi.files import read_json

from .errors import ShardError
from .manifest import MANIFEST_NAME
from .shard_check import shard_problems

BLOCKS = 17          # odd: one block sits on the middle of the file
BLOCK_BYTES = 4096   # one page; about one 2049-token sample of a .bin
SCHEME = {"blocks": BLOCKS, "block_bytes": BLOCK_BYTES}

_cache: dict[tuple, dict[str, Any]] = {}  # (path, size, mtime_ns, inode) -> fingerprint: one read per start


def file_fingerprint(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sampled_sha256": sha256 of the sampled blocks (of all bytes when small)}."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key in _cache:
        return _cache[key]
    size, digest = stat.st_size, hashlib.sha256()
    with open(path, "rb") as stream:
        if size <= BLOCKS * BLOCK_BYTES:
            digest.update(stream.read())
        else:
            for i in range(BLOCKS):
                stream.seek(i * (size - BLOCK_BYTES) // (BLOCKS - 1))
                digest.update(stream.read(BLOCK_BYTES))
    _cache[key] = found = {"bytes": size, "sampled_sha256": digest.hexdigest()}
    return found


def _shard_files(directory: Path) -> list[str]:
    manifest = read_json(directory / MANIFEST_NAME)
    return [info["file"] for record in manifest["shards"] for info in record["files"].values()]


def directory_fingerprints(directory: str | Path) -> dict[str, dict[str, Any]]:
    """File name -> fingerprint, for every file of every shard in `directory`'s manifest.json."""
    directory = Path(directory)
    return {name: file_fingerprint(directory / name) for name in _shard_files(directory)}


def fingerprints_record(paths: list[str]) -> dict[str, Any]:
    """What a checkpoint records as `data_fingerprints`: the scheme and each directory's fingerprints."""
    return {"scheme": dict(SCHEME), "paths": {path: directory_fingerprints(path) for path in paths}}


def fingerprint_differences(directory: str, *, recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per shard file whose size or sampled content differs from the recorded fingerprint."""
    out = []
    for name, old in recorded.items():
        new = current.get(name)
        where = f"{directory}/{name}"
        if new is None:
            out.append(f"{where}: no longer in the directory's manifest.json")
        elif new["bytes"] != old["bytes"]:
            out.append(f"{where}: {old['bytes']:,} -> {new['bytes']:,} bytes")
        elif new["sampled_sha256"] != old["sampled_sha256"]:
            out.append(f"{where}: same size ({new['bytes']:,} bytes) but other bytes in its sampled blocks "
                       "(changed in place)")
    out += [f"{directory}/{name}: new in the directory's manifest.json" for name in current if name not in recorded]
    if len(out) > 3:  # a directory rewritten in place: the first files name it, a count says how far it goes
        out = [*out[:3], f"{directory}: {len(out) - 3} more shard files differ"]
    return out


def verify_shard_bytes(paths: list[str], *, rank: int = 0, world: int = 1) -> int:
    """`--verify-shards`: every byte of every shard file (this rank's share of the shards: every
    `world`-th one) against its directory's manifest.json sha256, on parallel threads (sha256 releases
    the GIL); ShardError naming the first file that differs. Returns the number of shards checked."""
    shards = [(directory, record) for directory in map(Path, paths)
              for record in read_json(directory / MANIFEST_NAME)["shards"]][rank::world]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda item: shard_problems(item[0], item[1], checksums=True), shards)
        for problems in found:
            if problems:
                raise ShardError(f"--verify-shards: {problems[0]}: the shard is not the one its manifest.json "
                                 "was written for; restore it, or rebuild the directory with "
                                 "data_tools/preprocess_amber.py (then a resume needs data.allow_change: true)")
    return len(shards)
