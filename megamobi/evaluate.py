"""Loss and perplexity of a checkpoint on held-out shards, overall and per data source.

    python -m megamobi.evaluate --checkpoint runs/x/checkpoints/step_0002015 --data data/val/shards \
        [--samples 512] [--seq-len 2048] [--batch 4] [--device cuda] [--json]

The first `--samples` samples of the shard directories are read in order (deterministic), so two
checkpoints are always compared on the same tokens. For downstream benchmarks export the checkpoint
(`python -m megamobi.convert to-hf`) and run your usual harness on the Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from megamobi.data import ShardedDataset
from megamobi.generate import load_model


@torch.no_grad()
def evaluate(*, checkpoint: str, data: list[str], samples: int, seq_len: int, batch: int, device: str) -> dict:
    model = load_model(checkpoint).to(device)
    if seq_len > model.config.max_seq_len:
        raise SystemExit(f"error: --seq-len {seq_len} is longer than the model's max_seq_len {model.config.max_seq_len}")
    dataset = ShardedDataset(data)
    count = min(samples, len(dataset))
    # Only the evaluated samples' sources: the whole corpus's per-sample array would be O(N) memory.
    source_of = np.array([dataset.source_of(i) for i in range(count)], dtype=np.int64)
    loss_sum = np.zeros(len(dataset.sources))
    token_count = np.zeros(len(dataset.sources))
    for start in range(0, count, batch):
        rows = np.stack([dataset[i][:seq_len + 1] for i in range(start, min(start + batch, count))]).astype(np.int64)
        tokens = torch.from_numpy(rows).to(device)
        logits = model(tokens[:, :-1]).float()
        per_sequence = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").sum(dim=1).cpu().numpy()
        np.add.at(loss_sum, source_of[start:start + len(rows)], per_sequence)
        np.add.at(token_count, source_of[start:start + len(rows)], seq_len)
    per_source = {name: {"loss": loss_sum[i] / token_count[i], "perplexity": math.exp(loss_sum[i] / token_count[i]),
                         "tokens": int(token_count[i])}
                  for i, name in enumerate(dataset.sources) if token_count[i]}
    loss = loss_sum.sum() / max(token_count.sum(), 1)
    return {"checkpoint": checkpoint, "samples": count, "seq_len": seq_len, "loss": loss,
            "perplexity": math.exp(loss), "per_source": per_source}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamobi.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, nargs="+", help="shard directories (data_tools/preprocess_amber.py)")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = evaluate(checkpoint=args.checkpoint, data=args.data, samples=args.samples, seq_len=args.seq_len,
                      batch=args.batch, device=args.device)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} "
          f"over {result['samples']} samples x {args.seq_len} tokens")
    for name, r in sorted(result["per_source"].items()):
        print(f"  {name:<24} loss {r['loss']:.4f}  perplexity {r['perplexity']:9.2f}  ({r['tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
