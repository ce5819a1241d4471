"""Token ids that do not fit the model: refused before a run starts, and guarded in every batch.

An id >= vocab_size makes the embedding raise an IndexError at step 1 on CPU, and a device-side
assert that kills the job on a GPU. The preprocessor records the largest id of each shard directory
(`max_token_id` in manifest.json); manifests written before that are read as follows: a recorded
vocab_size within the model's bounds every id (the preprocessor refused larger ids); otherwise the
shards are scanned when small, and refused with what to do when not.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megamobi.files import read_json

from .errors import DataConfigError
from .indexed_format import SEQ_LEN, TOKEN_DTYPE
from .manifest import MANIFEST_NAME

MAX_SCAN_BYTES = 2 << 30  # an old manifest's shards are scanned for their largest id up to this size


def max_token_id(directory: str | Path, manifest: dict | None = None, *, model_vocab_size: int) -> int | None:
    """The largest token id in a shard directory: recorded, implied, or scanned (None: unknown, too big to scan)."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST_NAME) if manifest is None else manifest
    if isinstance(manifest.get("max_token_id"), int):
        return manifest["max_token_id"]
    data_vocab = manifest.get("vocab_size")
    if isinstance(data_vocab, int) and 0 < data_vocab <= model_vocab_size:
        return data_vocab - 1  # the preprocessor refused every id >= vocab_size: an upper bound is enough
    total = sum(s["files"]["bin"]["bytes"] for s in manifest.get("shards", []))
    if total > MAX_SCAN_BYTES:
        return None
    largest = -1
    for shard in manifest.get("shards", []):
        n = shard["num_samples"]
        if n:
            tokens = np.memmap(directory / shard["files"]["bin"]["file"], dtype=TOKEN_DTYPE, mode="r", shape=(n, SEQ_LEN))
            largest = max(largest, int(tokens.max()))
    return largest


def check_token_ids(paths: Sequence[str | Path], *, vocab_size: int) -> None:
    """Raise DataConfigError naming the directory, its largest id and the model's vocab_size."""
    for path in paths:
        largest = max_token_id(path, model_vocab_size=vocab_size)
        if largest is None:
            raise DataConfigError(
                f"{path}: its manifest.json predates max_token_id and records vocab_size "
                f"{read_json(Path(path) / MANIFEST_NAME).get('vocab_size')}, more than the model's vocab_size {vocab_size}, "
                "and the shards are too large to scan here; rebuild them with data_tools/preprocess_amber.py "
                "(--overwrite) to record the largest id, or use a model with the data's vocabulary")
        if largest >= vocab_size:
            raise DataConfigError(
                f"{path}: token ids up to {largest} do not fit the model's vocab_size {vocab_size} (ids must be "
                f"< vocab_size); use the model the data was tokenized for (vocab_size >= {largest + 1}) or "
                "re-tokenize the data with the model's tokenizer")


def check_batch_ids(samples: Sequence[np.ndarray], *, vocab_size: int, where: str) -> None:
    """The loader's second guard: one max per micro-batch (cheap next to the step)."""
    largest = max(int(s.max()) for s in samples)
    if largest >= vocab_size:
        raise DataConfigError(f"{where}: token id {largest} does not fit the model's vocab_size {vocab_size}; the data "
                              "was not tokenized for this model (its manifest.json understates its ids). Use the "
                              "model the data was tokenized for, or re-tokenize the data")
