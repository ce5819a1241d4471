"""Random-token Amber samples turned into real megamobi shards, for benchmarks and the GPU check.

    python bench/synthetic_shards.py --output /tmp/shards --samples 64 --vocab-size 32000

The tokens are uniform random (the loss stays near ln(vocab)); what matters here is that the data
path is the real one: the preprocessor writes the shards and manifest, the Trainer's loader reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from megamobi.data.preprocess import PreprocessOptions, preprocess

SAMPLE_TOKENS = 2049


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
