"""manifest.json reading/writing and file checksums."""
import hashlib
import json
import os
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.json"  # resume state of an unfinished run; removed when done
FORMAT_NAME = "megamobi-shards"
FORMAT_VERSION = 1


def sha256_file(path: Path, *, block_bytes: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary name, fsync, rename: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as stream:
        json.dump(data, stream, indent=1)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    with open(path) as stream:
        return json.load(stream)


def shard_paths(directory: Path, name: str) -> dict[str, Path]:
    """The three files of one shard. `name` is the Megatron path prefix (without suffix)."""
    return {
        "bin": directory / f"{name}.bin",
        "idx": directory / f"{name}.idx",
        "src": directory / f"{name}.src.npy",
    }
