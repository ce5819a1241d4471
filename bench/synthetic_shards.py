"""Random-token Amber samples turned into real megamobi shards, for benchmarks and the GPU check.

    python bench/synthetic_shards.py --output /tmp/shards --samples 64 --vocab-size 32000

The tokens are uniform random (the loss stays near ln(vocab)); what matters here is that the data
path is the real one: the preprocessor writes the shards and manifest, the Trainer's loader reads them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

from megamobi.data.indexed_format import DTYPE_CODE_UINT16, IDX_MAGIC, IDX_VERSION, idx_file_bytes
from megamobi.data.manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, shard_paths
from megamobi.data.preprocess import PreprocessOptions, preprocess

SAMPLE_TOKENS = 2049
# Amber's sources and their tokens (billions) in the LLM360 release: 1.26T tokens in all.
AMBER_TOKENS_B = {"arxiv": 30.00, "book": 28.86, "c4": 197.67, "refinedweb": 665.01, "starcoder": 291.92,
                  "stackexchange": 21.75, "wikipedia": 23.90}
AMBER_SHARDS = 360


def write_synthetic_shards(output: str | Path, *, samples: int, vocab_size: int, seed: int = 0) -> Path:
    output = Path(output)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "synthetic.jsonl"
        with open(source, "w") as f:
            for _ in range(samples):
                tokens = rng.integers(0, vocab_size, SAMPLE_TOKENS).tolist()
                f.write(json.dumps({"token_ids": tokens, "source": "synthetic"}) + "\n")
        preprocess(PreprocessOptions(inputs=[str(source)], output=str(output), vocab_size=vocab_size,
                                     samples_per_shard=max(samples, 1), progress=False, overwrite=True))
    return output


def write_sparse_shards(output: str | Path, *, tokens: int, shards: int = AMBER_SHARDS,
                        source_tokens: dict[str, float] = AMBER_TOKENS_B, seed: int = 0) -> Path:
    """A shard directory of `tokens` tokens (in SAMPLE_TOKENS samples) over `shards` shards, as the
    loader sees it, in little disk: each .bin is a sparse file of the right size (all zero tokens),
    each .idx a valid header sparse-extended to its size (the loader reads the header only), each
    .src.npy real: every sample's source drawn with the proportions of `source_tokens`, mixed within a
    shard as in Amber's chunks. The manifest is complete except the .bin/.idx sha256 (not computed for
    terabytes of zeros: do not verify checksums on it)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    names = list(source_tokens)
    shares = np.array([source_tokens[n] for n in names], dtype=np.float64)
    cumulative = np.cumsum(shares / shares.sum())
    samples = tokens // SAMPLE_TOKENS
    rng = np.random.default_rng(seed)
    records, totals = [], np.zeros(len(names), dtype=np.int64)
    for shard in range(shards):
        n = samples // shards + (shard < samples % shards)
        paths = shard_paths(output, f"shard_{shard:06d}_000")
        with open(paths["bin"], "wb") as stream:
            stream.truncate(n * SAMPLE_TOKENS * 2)
        with open(paths["idx"], "wb") as stream:  # the header of n sequences, then sparse to the full size
            stream.write(IDX_MAGIC + struct.pack("<QBQQ", IDX_VERSION, DTYPE_CODE_UINT16, n, n + 1))
            stream.truncate(idx_file_bytes(n))
        src = np.searchsorted(cumulative, rng.random(n), side="right").clip(0, len(names) - 1).astype(np.uint16)
        with open(paths["src"], "wb") as stream:
            np.save(stream, src)
        counts = np.bincount(src, minlength=len(names))
        totals += counts
        records.append({"name": paths["bin"].stem, "num_samples": int(n), "max_token_id": 0,
                        "source_tokens": {names[i]: int(c) * SAMPLE_TOKENS for i, c in enumerate(counts) if c},
                        "files": {"bin": {"file": paths["bin"].name, "bytes": n * SAMPLE_TOKENS * 2, "sha256": "0" * 64},
                                  "idx": {"file": paths["idx"].name, "bytes": idx_file_bytes(n), "sha256": "0" * 64},
                                  "src": {"file": paths["src"].name, "bytes": paths["src"].stat().st_size,
                                          "sha256": hashlib.sha256(paths["src"].read_bytes()).hexdigest()}}})
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "seq_length": SAMPLE_TOKENS, "dtype": "uint16",
                "dtype_code": 8, "samples_per_shard": -(-samples // shards), "num_samples": int(samples),
                "num_tokens": int(samples) * SAMPLE_TOKENS, "sources": names,
                "source_tokens": {n: int(c) * SAMPLE_TOKENS for n, c in zip(names, totals)}, "shards": records,
                "tokenizer": {"path": None, "sha256": None, "vocab_size": 32000, "eos_id": None}, "vocab_size": 32000,
                "max_token_id": 0, "input_format": "sparse", "inputs": []}
    tmp = output / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, output / MANIFEST_NAME)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.samples <= 0 or not 2 <= args.vocab_size <= 65536:
        print("synthetic_shards.py: error: --samples must be positive and --vocab-size within 2..65536", file=sys.stderr)
        return 2
    print(write_synthetic_shards(args.output, samples=args.samples, vocab_size=args.vocab_size, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
