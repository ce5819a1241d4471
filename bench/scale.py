"""Issue 19's figures in one run: the paper's data (1.26T tokens of Amber in 360 shards) fabricated
with sparse shard files, and each cost measured against its anchor in the same run.

    python bench/scale.py                                  # every section, up to the paper's scale
    python bench/scale.py --section blend,replay           # some of blend, replay, checkpoint, preprocess
    python bench/scale.py --quick                          # small sizes, a minute (tests/bench runs it)

Sections (rows: name, measured, anchor, ratio, goal, met):
  blend       build_datasets with Amber's proportions as source_weights, in a fresh process per size
              (1e9 .. 1.26e12 tokens): peak memory above the import baseline and start time, the first
              start (builds the per-block source table and caches it next to the shards) and a start
              with the cache (every rank); against the per-sample index megamobi held before
              (bench/legacy_blend.py) measured at the sizes it fits and extrapolated by its growth law
  replay      at the paper's size: one checkpoint's share of `python -m megamobi.checkpoints` (the
              consumed mix of the ~2118 steps between two checkpoints of 800 x 2048 tokens), first
              computed and then read from the run's cache; `--steps` of one step at 160 ranks, against
              the per-token loop it replaced, on the same windows
  checkpoint  bench/scale_checkpoint.py's rows (save / verify against dd, async stall)
  preprocess  bench/scale_preprocess.py's rows (per worker against the orjson/msgspec floor)
Shards are fabricated under --workdir (default $TMPDIR; sparse: ~2 bytes of real disk per sample).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from synthetic_shards import AMBER_SHARDS, AMBER_TOKENS_B, SAMPLE_TOKENS, write_sparse_shards  # noqa: E402

from megamobi.data.subsets import MAX_SPLIT_BLOCKS  # noqa: E402

PAPER_TOKENS = 1.26e12
GIB = 1 << 30
SECTIONS = ("blend", "replay", "checkpoint", "preprocess")
AMBER_WEIGHTS = dict(AMBER_TOKENS_B)
PAPER_RANKS, PAPER_GLOBAL_BATCH, PAPER_SEQ = 160, 800, 2048
PAPER_CHECKPOINTS = 363

_PROBE = r"""
import json, resource, sys, time
sys.path[:0] = {paths!r}
import numpy as np
from megamobi.data import build_datasets
from megamobi.data.shard_dataset import ShardedDataset
from megamobi.data.subsets import split_train_val
from legacy_blend import legacy_blend_index

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

kind, path, weights = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base_rss = rss()
start, cpu = time.perf_counter(), time.process_time()
if kind == "legacy":
    train, _ = split_train_val(ShardedDataset([path]), val_fraction=0.0, seed=1234)
    index = legacy_blend_index(train.sample_sources(), train.sources, weights)
    batch = index[np.arange(0, len(index), max(1, len(index) // 800))[:800]]
else:
    train, _ = build_datasets([path], source_weights=weights, val_fraction=0.0, seed=1234)
    start_s = time.perf_counter() - start
    positions = np.arange(0, len(train), max(1, len(train) // 800))[:800]
    t = time.perf_counter()
    train.subset_indices(positions)
    batch_s = time.perf_counter() - t
elapsed, cpu_s = time.perf_counter() - start, time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"samples": len(train), "seconds": elapsed if kind == "legacy" else start_s,
                  "batch_s": None if kind == "legacy" else batch_s, "cpu_s": cpu_s,
                  "peak_above_import": max(peak - base_rss, 1), "held": rss() - base_rss}}))
"""


def _probe(kind: str, path: Path, weights: dict) -> dict:
    """One start in a fresh process: peak / held memory above the import baseline, seconds."""
    code = _PROBE.format(paths=[str(BENCH.parent), str(BENCH)])
    out = subprocess.run([sys.executable, "-c", code, kind, str(path), json.dumps(weights)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares a + b * samples: (a, b)."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if len(points) == 1:
        return 0.0, float(y[0] / x[0])
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b)


def blend_figures(*, sizes: list[float], legacy_sizes: list[float], shards: int, workdir: Path) -> dict:
    figures: dict = {"sizes": [], "legacy": []}
    for tokens in sizes:
        path = write_sparse_shards(workdir / f"amber_{tokens:.0e}", tokens=int(tokens), shards=shards)
        first = _probe("new", path, AMBER_WEIGHTS)   # builds the cached per-block table
        cached = _probe("new", path, AMBER_WEIGHTS)  # what every rank, replay and evaluate pay
        figures["sizes"].append({"tokens": tokens, "first": first, "cached": cached})
        if tokens in legacy_sizes:
            figures["legacy"].append({"tokens": tokens, **_probe("legacy", path, AMBER_WEIGHTS)})
    return figures


def blend_rows(figures: dict) -> list[dict]:
    largest = figures["sizes"][-1]
    samples = largest["cached"]["samples"]
    paper_samples = int(PAPER_TOKENS) // SAMPLE_TOKENS
    peak_a, peak_b = _fit([(e["samples"], e["peak_above_import"]) for e in figures["legacy"]])
    time_a, time_b = _fit([(e["samples"], e["seconds"]) for e in figures["legacy"]])
    legacy_peak = peak_a + peak_b * samples
    legacy_s = time_a + time_b * samples
    # The new cost grows with the split's blocks (one per sample up to 2**20 samples, then 2**20 blocks of
    # more samples each): fit it where the block count is capped; below that it is the largest measured.
    capped = [(e["cached"]["samples"], e["cached"]["peak_above_import"]) for e in figures["sizes"]
              if e["cached"]["samples"] > MAX_SPLIT_BLOCKS]
    new_peak_a, new_peak_b = _fit(capped) if len(capped) >= 2 else (largest["cached"]["peak_above_import"], 0.0)
    where = f"{largest['tokens']:.3g} tokens, {samples / 1e6:.1f}M samples"
    legacy_where = ", ".join(f"{e['tokens']:.0e}" for e in figures["legacy"])
    rows = [
        {"name": f"blend start, peak above import (MiB), cached table, {where}",
         "measured": largest["cached"]["peak_above_import"] / 2**20,
         "anchor": f"{legacy_peak / 2**20:.0f} (per-sample index: {peak_b:.1f} B/sample fit at {legacy_where})",
         "ratio": largest["cached"]["peak_above_import"] / legacy_peak, "goal": "<= 1 GiB",
         "met": largest["cached"]["peak_above_import"] <= GIB},
        {"name": f"blend start, seconds, cached table, {where} ({largest['cached']['cpu_s']:.1f} CPU-s)",
         "measured": largest["cached"]["seconds"],
         "anchor": f"{legacy_s:.3g} (per-sample index, fit)", "ratio": largest["cached"]["seconds"] / legacy_s,
         "goal": "<= 10 s", "met": largest["cached"]["seconds"] <= 10},
        {"name": f"blend first start (builds + caches the table), seconds, {where} "
                 f"({largest['first']['cpu_s']:.1f} CPU-s)",
         "measured": largest["first"]["seconds"], "anchor": f"{legacy_s:.3g} (per-sample index, fit)",
         "ratio": largest["first"]["seconds"] / legacy_s, "goal": "<= 10 s", "met": largest["first"]["seconds"] <= 10},
        {"name": "blend first start, peak above import (MiB)", "measured": largest["first"]["peak_above_import"] / 2**20,
         "anchor": f"{legacy_peak / 2**20:.0f}", "ratio": largest["first"]["peak_above_import"] / legacy_peak,
         "goal": "<= 1 GiB", "met": largest["first"]["peak_above_import"] <= GIB},
        {"name": "blend growth, bytes per sample (new: fit over the sizes above 2**20 samples)", "measured": new_peak_b,
         "anchor": f"{peak_b:.1f} (per-sample index)", "ratio": new_peak_b / peak_b if peak_b else None,
         "goal": "info", "met": None},
        {"name": f"blend at the paper's scale ({paper_samples / 1e6:.1f}M samples), peak MiB per rank (extrapolated)",
         "measured": (new_peak_a + new_peak_b * paper_samples) / 2**20,
         "anchor": f"{(peak_a + peak_b * paper_samples) / GIB:.1f} GiB (per-sample index)",
         "ratio": (new_peak_a + new_peak_b * paper_samples) / (peak_a + peak_b * paper_samples), "goal": "info",
         "met": None},
        {"name": "blend: one global batch (800 picks) -> samples, ms", "measured": largest["cached"]["batch_s"] * 1e3,
         "anchor": "-", "ratio": None, "goal": "info", "met": None},
    ]
    return rows


def _fake_run(run_dir: Path, shards: Path, *, weights: dict | None, checkpoints: int, steps_per_checkpoint: int,
              ranks: int, global_batch: int, seq_len: int) -> Path:
    """A run directory whose checkpoints record only what replay reads (megamobi.json's provenance)."""
    from megamobi.files import sha256_file

    digest = sha256_file(shards / "manifest.json")
    for c in range(1, checkpoints + 1):
        step = c * steps_per_checkpoint
        segment = {"first_step": 1, "last_step": step, "consumed_samples_before": 0, "global_batch_size": global_batch,
                   "micro_batch_size": 1, "data_parallel_size": ranks, "seq_len": seq_len,
                   "data": {"paths": [str(shards)], "source_weights": weights, "val_fraction": 0.0, "seed": 1234},
                   "data_manifests": {str(shards): digest}, "data_changed": []}
        checkpoint = run_dir / "checkpoints" / f"step_{step:07d}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        (checkpoint / "megamobi.json").write_text(json.dumps(
            {"step": step, "consumed_samples": step * global_batch, "data_provenance": [segment]}))
    return run_dir


def _legacy_sources_of(order, bases) -> np.ndarray:
    """TrainOrder.sources_of as it was before issue 19 (a mask over the bases per shard)."""
    bases = np.asarray(bases, dtype=np.int64)
    shards = np.searchsorted(order.base._offsets, bases, side="right") - 1
    out = np.empty_like(bases)
    for shard in np.unique(shards):
        mask = shards == shard
        local, mapping = order._shard_sources(int(shard))
        out[mask] = mapping[np.asarray(local[bases[mask] - order.base._offsets[shard]], dtype=np.int64)]
    return out


def _legacy_step_listing(replay, step: int) -> int:
    """RunReplay.sequences as it was before issue 19, for one step: per sequence a locate, a source
    read and a token by token conversion. Returns the tokens listed."""
    from megamobi.data.replay import Sequence

    [segment] = replay.segments
    order = replay.order(segment)
    d, mb, gb = segment.data_parallel_size, segment.micro_batch_size, segment.global_batch_size
    per_rank, listed, start = gb // d, 0, segment.position(step)
    for r in range(d):
        positions = np.arange(start + r * per_rank, start + (r + 1) * per_rank, dtype=np.int64)
        bases, offsets = order.windows_at(positions)
        for i, (base, offset) in enumerate(zip(bases.tolist(), offsets.tolist())):
            shard, row = order.locate(base)
            tokens = order.base[base][offset:offset + segment.seq_len + 1]
            seq = Sequence(step=step, stage=segment.stage + 1, rank=r, micro_batch=i // mb, sample_index=base,
                           shard=str(shard), row=row, offset=offset,
                           source=order.base.sources[int(_legacy_sources_of(order, [base])[0])],
                           tokens=[int(t) for t in tokens], skipped=step in segment.skipped_steps)
            listed += len(seq.tokens)
    return listed


def replay_figures(*, tokens: float, shards: int, checkpoints: int, workdir: Path, ranks: int, global_batch: int,
                   seq_len: int, steps_per_checkpoint: int) -> dict:
    from megamobi.data.replay import RunReplay, consumed_mixes

    path = workdir / f"amber_{tokens:.0e}"
    if not (path / "manifest.json").is_file():
        write_sparse_shards(path, tokens=int(tokens), shards=shards)
    figures: dict = {"tokens": tokens, "steps_per_checkpoint": steps_per_checkpoint, "checkpoints": checkpoints}
    from megamobi.data import build_datasets

    build_datasets([path], source_weights=AMBER_WEIGHTS)  # the shard set's block table, built once (blend rows)
    for label, weights in (("blended", AMBER_WEIGHTS), ("unblended", None)):
        # A fresh call over 1 and over `checkpoints` checkpoints: the difference is the marginal cost of
        # a checkpoint (its steps replayed), the rest the call's fixed cost (opening the data, the table).
        calls = {}
        for count in (1, checkpoints):
            run = _fake_run(workdir / f"run_{label}_{count}", path, weights=weights, checkpoints=count,
                            steps_per_checkpoint=steps_per_checkpoint, ranks=ranks, global_batch=global_batch,
                            seq_len=seq_len)
            start, cpu = time.perf_counter(), time.process_time()
            mixes = consumed_mixes(run)
            calls[count] = (time.perf_counter() - start, time.process_time() - cpu)
            assert len(mixes) == count and all(mixes.values()), mixes
        start = time.perf_counter()
        consumed_mixes(run)
        cached_s = time.perf_counter() - start
        extra = max(checkpoints - 1, 1)
        figures[label] = {"first_per_checkpoint_s": (calls[checkpoints][0] - calls[1][0]) / extra,
                          "first_per_checkpoint_cpu_s": (calls[checkpoints][1] - calls[1][1]) / extra,
                          "fixed_s": calls[1][0], "fixed_cpu_s": calls[1][1],
                          "cached_per_checkpoint_s": cached_s / checkpoints}
    # --steps: one step at `ranks` ranks, today's vectorised read against the per-token loop, on the same
    # warmed replay (shards opened, pages cached), the best of three each.
    replay = RunReplay(workdir / f"run_unblended_{checkpoints}")
    step = steps_per_checkpoint
    sum(len(seq.tokens) for seq in replay.sequences(step - 1, step - 1))
    new_s, old_s = [], []
    for _ in range(3):
        start = time.perf_counter()
        new_tokens = sum(len(seq.tokens) for seq in replay.sequences(step, step))
        new_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        old_tokens = _legacy_step_listing(replay, step)
        old_s.append(time.perf_counter() - start)
    assert new_tokens == old_tokens
    figures["steps_s"], figures["legacy_steps_s"], figures["steps_tokens"] = min(new_s), min(old_s), new_tokens
    return figures


def replay_rows(figures: dict) -> list[dict]:
    rows = []
    steps = figures["steps_per_checkpoint"]
    for label in ("blended", "unblended"):
        entry = figures[label]
        rows.append({"name": f"megamobi.checkpoints, {label}, per new checkpoint ({steps} steps), s "
                             f"({entry['first_per_checkpoint_cpu_s']:.2f} CPU-s; per call +{entry['fixed_s']:.2f} s)",
                     "measured": entry["first_per_checkpoint_s"], "anchor": "1 s", "ratio": entry["first_per_checkpoint_s"],
                     "goal": "<= 1 s", "met": entry["first_per_checkpoint_s"] <= 1})
        rows.append({"name": f"megamobi.checkpoints, {label}, per checkpoint, cached, s",
                     "measured": entry["cached_per_checkpoint_s"], "anchor": "1 s",
                     "ratio": entry["cached_per_checkpoint_s"], "goal": "<= 1 s", "met": entry["cached_per_checkpoint_s"] <= 1})
    speedup = figures["legacy_steps_s"] / figures["steps_s"]
    rows.append({"name": "replay --steps, one step, s (speed-up over the per-token loop)", "measured": figures["steps_s"],
                 "anchor": f"{figures['legacy_steps_s']:.3g} s (per-token loop)", "ratio": speedup, "goal": ">= 10x",
                 "met": speedup >= 10})
    return rows


def print_rows(title: str, table: list[dict]) -> None:
    print(f"== {title}")
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3g}"
        met = "" if row["met"] is None else "met" if row["met"] else "NOT MET"
        print(f"{row['name']:92s} {row['measured']:10.4g}  anchor {row['anchor']:>44s}  ratio {ratio:>7s}  "
              f"goal {row['goal']:9s} {met}", flush=True)


def run(*, sections: list[str], quick: bool, workdir: Path) -> dict:
    """Every asked section's rows (and the blend / replay figures), printed as they come."""
    out: dict = {"load_average": os.getloadavg(), "cores": os.cpu_count(), "quick": quick}
    shards = 36 if quick else AMBER_SHARDS
    if "blend" in sections:
        sizes = [2e8, 1e9] if quick else [1e9, 1e10, 1e11, PAPER_TOKENS]
        legacy = sizes if quick else [1e9, 1e10, 1e11]
        out["blend_figures"] = blend_figures(sizes=sizes, legacy_sizes=legacy, shards=shards, workdir=workdir)
        out["blend"] = blend_rows(out["blend_figures"])
        print_rows("blend", out["blend"])
    if "replay" in sections:
        if quick:
            settings = dict(tokens=1e9, ranks=8, global_batch=64, seq_len=PAPER_SEQ, steps_per_checkpoint=200, checkpoints=3)
        else:  # the paper: 1.26T tokens in 363 checkpoints of 800 x 2048-token sequences
            steps = int(PAPER_TOKENS / (PAPER_GLOBAL_BATCH * PAPER_SEQ) / PAPER_CHECKPOINTS)
            settings = dict(tokens=PAPER_TOKENS, ranks=PAPER_RANKS, global_batch=PAPER_GLOBAL_BATCH, seq_len=PAPER_SEQ,
                            steps_per_checkpoint=steps, checkpoints=3)
        out["replay_figures"] = replay_figures(shards=shards, workdir=workdir, **settings)
        out["replay"] = replay_rows(out["replay_figures"])
        print_rows("replay", out["replay"])
    if "checkpoint" in sections:
        import scale_checkpoint

        out["checkpoint"] = scale_checkpoint.section(quick=quick, workdir=workdir)
        print_rows("checkpoint", out["checkpoint"])
    if "preprocess" in sections:
        import scale_preprocess

        out["preprocess"] = scale_preprocess.section(quick=quick, workdir=workdir)
        print_rows("preprocess", out["preprocess"])
    out["load_average_end"] = os.getloadavg()
    print(f"(load average {out['load_average'][0]:.1f} at the start, {out['load_average_end'][0]:.1f} at the end, "
          f"on {out['cores']} cores)")
    return out


def _sections(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma list of {', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--section", type=_sections, default=list(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="small sizes (a minute)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to fabricate the shards (default: $TMPDIR)")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = parser.parse_args(argv)
    if args.workdir is not None and not args.workdir.is_dir():
        parser.error(f"--workdir {args.workdir}: not a directory")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="scale-") as tmp:
        out = run(sections=args.section, quick=args.quick, workdir=Path(tmp))
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
