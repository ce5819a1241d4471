"""Full verification of a shard directory against its manifest (used by inspect_shards.py)."""
from pathlib import Path

import numpy as np

from megamobi.files import read_json

from .errors import ShardError
from .manifest import MANIFEST_NAME
from .shard_check import shard_problems


def verify_directory(directory: Path) -> tuple[dict, list[str]]:
    """(manifest, problems): sizes, idx headers, sha256 of every file, source ids in range,
    per-shard source token counts recomputed from the .src.npy files."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ShardError(f"{manifest_path}: missing; not a finished shard directory "
                         "(re-run data_tools/preprocess_amber.py to finish it)")
    manifest = read_json(manifest_path)
    problems: list[str] = []
    for record in manifest["shards"]:
        found = shard_problems(directory, record, checksums=True)
        problems.extend(found)
        if found:
            continue
        src = np.load(directory / record["files"]["src"]["file"])
        if len(src) != record["num_samples"]:
            problems.append(f"{record['name']}: {len(src)} source ids for {record['num_samples']} samples")
            continue
        if len(src) and int(src.max()) >= len(manifest["sources"]):
            problems.append(f"{record['name']}: source id {int(src.max())} not in the source table")
            continue
        counts = np.bincount(src, minlength=len(manifest["sources"])) * manifest["seq_length"]
        recount = {manifest["sources"][i]: int(c) for i, c in enumerate(counts) if c}
        if recount != record["source_tokens"]:
            problems.append(f"{record['name']}: per-source token counts differ from the manifest")
    return manifest, problems
