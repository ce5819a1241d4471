"""manifest.json of a shard directory: its name, format tag and the files of one shard."""
from pathlib import Path

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.jsonl"  # resume state of an unfinished run (megamobi.data.progress_log); kept
FORMAT_NAME = "megamobi-shards"
FORMAT_VERSION = 1


def shard_paths(directory: Path, name: str) -> dict[str, Path]:
    """The three files of one shard. `name` is the Megatron path prefix (without suffix)."""
    return {
        "bin": directory / f"{name}.bin",
        "idx": directory / f"{name}.idx",
        "src": directory / f"{name}.src.npy",
    }
