"""Loss and perplexity of a checkpoint on shards, overall and per data source.

    python -m megamobi.evaluate --checkpoint runs/x/checkpoints/step_0002015 --split val
    python -m megamobi.evaluate --checkpoint runs/x/checkpoints/step_0002015 --data data/val/shards \
        [--samples 512] [--seq-len L] [--batch 4] [--device cuda] [--json]

Which samples:
  --split val     the run's own validation split, rebuilt from the data config recorded in the
                  checkpoint (paths, val_fraction, seed; with data stages, those of the stage the
                  checkpoint was training): never a training sample
  --split train   the rest of the run's data (its training split, unblended, in shard order)
  --split all     every sample of the shard directories (the default with --data)
  --data DIR ...  the shard directories (default: the paths recorded in the checkpoint)
The first --samples samples (2049 tokens each) of the selection are read in order, so two
checkpoints are always compared on the same tokens.

Each sample is cut into 2048 / L windows of L + 1 tokens exactly as training cuts it
(megamobi/training/data_stream.py), and every window is scored: all 2048 predicted tokens of a
sample count, whatever L. L (--seq-len) defaults to the run's batch.seq_len recorded in the
checkpoint, else to the model's max_seq_len (largest power of two within it).

For downstream benchmarks use `python -m megamobi.eval` or export the checkpoint
(`python -m megamobi.convert to-hf`) and run your usual harness on the Hugging Face model.
Exit status 2 for a user mistake (argument, file, split), with one line saying what to do.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from megamobi.cli_support import UserError, checkpoint_arg, fail, positive_int

SAMPLE_TOKENS = 2049  # as megamobi.training.run_config.SAMPLE_TOKENS (not imported: keeps --help fast)


def default_seq_len(*, max_seq_len: int, recorded: int | None) -> int:
    if recorded is not None and recorded <= max_seq_len:
        return recorded
    return 1 << (min(max_seq_len, SAMPLE_TOKENS - 1).bit_length() - 1)  # powers of two divide 2048


def recorded_data(manifest: dict) -> dict | None:
    """The data config the checkpoint was training on, as recorded (None for e.g. a from-hf import): the
    run's data section, or with data.stages the stage of its last step (paths, val_fraction, its seed)."""
    data = (manifest.get("run_config") or {}).get("data")
    if data and data.get("stages"):
        from megamobi.data.stages import checkpoint_stage

        return checkpoint_stage(manifest).data_record()
    return data


def select_samples(*, manifest: dict, checkpoint: str, data: list[str] | None, split: str):
    """(dataset, description): the samples to evaluate, in order."""
    from megamobi.data import DataError, ShardedDataset
    from megamobi.data.subsets import split_train_val

    recorded = recorded_data(manifest)
    if split != "all" and recorded is None:
        raise UserError(f"--split {split}: {checkpoint} records no run data config (e.g. a `convert from-hf` import); "
                        "use --data DIR --split all")
    if data:
        paths = data
    else:  # relative paths as the run saw them: from here, else from its launch directory
        from megamobi.checkpointing.recorded_paths import recorded_data_paths

        paths = [str(p) for p in recorded_data_paths(manifest)]
    if not paths:
        raise UserError("give --data (shard directories), or --split val|train to use the run's recorded data")
    for path in paths:
        if Path(path).is_file():
            raise UserError(f"--data {path}: is a file; give the shard directory (the one holding manifest.json)")
        if not Path(path).is_dir():
            how = "" if data else " (recorded in the checkpoint: moved since, or run from another directory; give --data)"
            raise UserError(f"--data {path}: no such directory{how}")
    try:
        base = ShardedDataset(paths)
        if split == "all":
            return base, f"all of {', '.join(map(str, paths))}"
        if not recorded.get("val_fraction"):
            raise UserError(f"--split {split}: the run had no validation split (data.val_fraction 0), so every sample "
                            "was training data; use --split all, or --data with held-out shards")
        train, val = split_train_val(base, val_fraction=recorded["val_fraction"], seed=recorded.get("seed", 1234))
    except DataError as err:
        raise UserError(str(err)) from None
    chosen = val if split == "val" else train
    return chosen, (f"{split} split (val_fraction {recorded['val_fraction']}, seed {recorded.get('seed', 1234)}) "
                    f"of {', '.join(map(str, paths))}")


def _source_of(dataset, index: int) -> int:
    if hasattr(dataset, "base_index"):  # a split: the base dataset knows the sources
        return dataset.base.source_of(dataset.base_index(index))
    return dataset.source_of(index)


def evaluate(*, checkpoint: str, data: list[str] | None = None, split: str = "all", samples: int = 512,
             seq_len: int | None = None, batch: int = 4, device: str = "cpu") -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from megamobi.checkpointing.manifest import read_manifest
    from megamobi.generate import load_model
    from megamobi.training.data_stream import Windows

    checkpoint_arg(checkpoint)
    manifest = read_manifest(checkpoint)
    model = load_model(checkpoint, use="evaluate").to(device)  # verified against its manifest first
    recorded_len = ((manifest.get("run_config") or {}).get("batch") or {}).get("seq_len")
    if seq_len is None:
        seq_len = default_seq_len(max_seq_len=model.config.max_seq_len, recorded=recorded_len)
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's max_seq_len {model.config.max_seq_len}")
    if (SAMPLE_TOKENS - 1) % seq_len:
        raise UserError(f"--seq-len {seq_len} must divide {SAMPLE_TOKENS - 1}: samples are cut into windows of "
                        f"seq_len + 1 tokens as in training")
    dataset, description = select_samples(manifest=manifest, checkpoint=checkpoint, data=data, split=split)
    count = min(samples, len(dataset))
    if count == 0:
        raise UserError(f"no samples to evaluate in the {description}")
    windows = Windows(dataset, seq_len)
    num_windows = count * windows.per_sample
    # Only the evaluated samples' sources: the whole corpus's per-sample array would be O(N) memory.
    source_of = np.array([_source_of(dataset, i) for i in range(count)], dtype=np.int64)
    names = dataset.sources
    loss_sum, token_count = np.zeros(len(names)), np.zeros(len(names))
    with torch.no_grad():
        for start in range(0, num_windows, batch):
            indices = range(start, min(start + batch, num_windows))
            rows = np.stack([windows[i] for i in indices]).astype(np.int64)
            tokens = torch.from_numpy(rows).to(device)
            logits = model(tokens[:, :-1]).float()
            per_window = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").sum(dim=1).cpu().numpy()
            window_sources = source_of[[i // windows.per_sample for i in indices]]
            np.add.at(loss_sum, window_sources, per_window)
            np.add.at(token_count, window_sources, seq_len)
    per_source = {name: {"loss": loss_sum[i] / token_count[i], "perplexity": math.exp(loss_sum[i] / token_count[i]),
                         "tokens": int(token_count[i])}
                  for i, name in enumerate(names) if token_count[i]}
    loss = loss_sum.sum() / token_count.sum()
    return {"checkpoint": checkpoint, "split": split, "selection": description, "samples": count,
            "windows": num_windows, "seq_len": seq_len, "tokens": int(token_count.sum()), "loss": loss,
            "perplexity": math.exp(loss), "per_source": per_source}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megamobi.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (RUN_DIR/checkpoints/step_*)")
    parser.add_argument("--data", nargs="+", help="shard directories (default: the ones recorded in the checkpoint)")
    parser.add_argument("--split", choices=["val", "train", "all"], default=None,
                        help="which samples of the data (default: all with --data, else val)")
    parser.add_argument("--samples", type=positive_int, default=512, help="samples of 2049 tokens (default 512)")
    parser.add_argument("--seq-len", type=positive_int, default=None,
                        help="window length (default: the run's batch.seq_len, else the model's max_seq_len)")
    parser.add_argument("--batch", type=positive_int, default=4, help="windows per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    from megamobi.devices import check_device

    try:
        device = check_device(args.device)
    except UserError as err:
        return fail(err)
    split = args.split or ("all" if args.data else "val")
    try:
        result = evaluate(checkpoint=args.checkpoint, data=args.data, split=split, samples=args.samples,
                          seq_len=args.seq_len, batch=args.batch, device=device)
    except UserError as err:
        return fail(err)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint}: loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f} over "
          f"{result['samples']} samples ({result['windows']} windows x {result['seq_len']} tokens) of the "
          f"{result['selection']}")
    for name, r in sorted(result["per_source"].items()):
        print(f"  {name:<24} loss {r['loss']:.4f}  perplexity {r['perplexity']:9.2f}  ({r['tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
