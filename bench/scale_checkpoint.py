"""Checkpoints at the disk's speed: a world-size-1 `Trainer.save` against `dd oflag=direct`, resume
verification against `dd iflag=direct`, and the training stall of `checkpoint.async: true` against a
synchronous save, all measured in this one run, on the same disk.

    python bench/scale_checkpoint.py [--model mobillama-0.5b] [--workdir DIR] [--json]
    python bench/scale_checkpoint.py --model bench/mid-cpu.yaml     # a quick run (~20M parameters)

Rows (name, measured, anchor, ratio, goal, met):
  save           checkpoint bytes / seconds of a synchronous save (hashed while written, fsynced),
                 over dd's direct-I/O write bandwidth of a file as large as the checkpoint
  verify         checkpoint bytes / seconds of verify_checkpoint() (the checkpoint evicted from the
                 page cache first), over dd's direct-I/O read bandwidth of the same amount
  async stall    seconds the step waits in an async save (the copy of the state into reused CPU
                 buffers; the second async save, the first allocates them) over the synchronous save
Needs about 3x the training state in memory for the async row (state, snapshot, gathered copies):
mobillama-0.5b in fp32 wants ~26 GB; use --no-async on smaller machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def dd_bandwidth(path: Path, *, total_bytes: int, write: bool) -> float:
    """Bytes per second of dd with direct I/O (no page cache) over `total_bytes` in 64 MiB blocks."""
    block = 64 << 20
    count = max(1, -(-total_bytes // block))
    if write:
        argv = ["dd", "if=/dev/zero", f"of={path}", f"bs={block}", f"count={count}", "oflag=direct", "conv=fsync"]
    else:
        argv = ["dd", f"if={path}", "of=/dev/null", f"bs={block}", f"count={count}", "iflag=direct"]
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return count * block / (time.perf_counter() - start)


def evict(directory: Path) -> None:
    """Drop a folder's files from the page cache, so that reading them reads the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _trainer(model: str, work: Path):
    from synthetic_shards import write_synthetic_shards
    from throughput import start_single_process_group

    from megamobi.config_io import from_dict
    from megamobi.model_config import load_model_config
    from megamobi.training.loop import Trainer
    from megamobi.training.run_config import RunConfig

    config = load_model_config(model)
    shards = write_synthetic_shards(work / "shards", samples=8, vocab_size=config.vocab_size)
    run = from_dict(RunConfig, {
        "run_dir": str(work / "run"), "model": model, "data": {"paths": [str(shards)]},
        "batch": {"micro_batch_size": 1, "global_batch_size": 1, "seq_len": 16},
        "train": {"steps": 1000, "log_interval": 1000}, "precision": "fp32", "optimizer": {"warmup_steps": 1},
        "parallel": {"zero_stage": 1}, "checkpoint": {"interval_tokens": 0},
    }, where="bench/scale_checkpoint.py")
    run.validate(world_size=1)
    start_single_process_group()
    trainer = Trainer(run)
    batches = trainer.data.train_batches(consumed_samples=0, dp_rank=0, dp_size=1)
    trainer._train_step(batches)  # AdamW's state exists from the first step on
    return trainer, batches


def _cpu_s() -> float:
    """CPU seconds of this process, every thread, user + system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def measure(*, model: str, workdir: Path | None, with_async: bool) -> dict:
    from megamobi.checkpointing.manifest import verify_checkpoint
    from megamobi.checkpointing.writer import CheckpointWriter

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        work = Path(tmp)
        trainer, batches = _trainer(model, work)
        trainer.state.step = 1
        start, cpu = time.perf_counter(), _cpu_s()
        saved = trainer.save()
        save_s, save_cpu_s = time.perf_counter() - start, _cpu_s() - cpu
        size = _bytes(saved)
        dd_write = dd_bandwidth(work / "dd.bin", total_bytes=size, write=True)
        evict(work / "dd.bin")
        dd_read = dd_bandwidth(work / "dd.bin", total_bytes=size, write=False)
        (work / "dd.bin").unlink()
        evict(saved)
        start, cpu = time.perf_counter(), _cpu_s()
        problems = verify_checkpoint(saved)
        verify_s, verify_cpu_s = time.perf_counter() - start, _cpu_s() - cpu
        assert not problems, problems
        figures = {"model": model, "checkpoint_bytes": size, "save_s": save_s, "save_Bps": size / save_s,
                   "dd_write_Bps": dd_write, "verify_s": verify_s, "verify_Bps": size / verify_s,
                   "dd_read_Bps": dd_read, "save_cpu_s": save_cpu_s, "verify_cpu_s": verify_cpu_s,
                   "load_average": os.getloadavg()[0], "cores": os.cpu_count()}
        if with_async:
            trainer.checkpoint_writer = CheckpointWriter(background=True)
            stalls = []
            for step in (2, 3):  # the first async save allocates its snapshot buffers; the second reuses them
                trainer._train_step(batches)
                trainer.state.step = step
                start = time.perf_counter()
                trainer.save()
                stalls.append(time.perf_counter() - start)
                trainer.wait_for_checkpoint()
            figures.update(async_first_stall_s=stalls[0], async_stall_s=stalls[1])
        return figures


def rows(figures: dict) -> list[dict]:
    gb = 1e9
    table = [
        {"name": f"save, world size 1, {figures['model']} ({figures['checkpoint_bytes'] / gb:.2f} GB), GB/s",
         "measured": figures["save_Bps"] / gb, "anchor": f"{figures['dd_write_Bps'] / gb:.3g} (dd oflag=direct)",
         "ratio": figures["save_Bps"] / figures["dd_write_Bps"], "goal": ">= 0.8"},
        {"name": "resume verification (page cache evicted), GB/s", "measured": figures["verify_Bps"] / gb,
         "anchor": f"{figures['dd_read_Bps'] / gb:.3g} (dd iflag=direct)",
         "ratio": figures["verify_Bps"] / figures["dd_read_Bps"], "goal": ">= 0.8"},
    ]
    table.append({"name": "CPU seconds per GB: save / verify (all threads)",
                  "measured": figures["save_cpu_s"] / (figures["checkpoint_bytes"] / gb),
                  "anchor": f"{figures['verify_cpu_s'] / (figures['checkpoint_bytes'] / gb):.3g} (verify)",
                  "ratio": None, "goal": "info"})
    if "async_stall_s" in figures:
        table.append({"name": f"async save: step stall, s (first save: {figures['async_first_stall_s']:.2f} s)",
                      "measured": figures["async_stall_s"], "anchor": f"{figures['save_s']:.3g} s (sync save)",
                      "ratio": figures["async_stall_s"] / figures["save_s"], "goal": "<= 0.1"})
    for row in table:
        goal = row["goal"]
        row["met"] = None if goal == "info" else row["ratio"] >= 0.8 if goal.startswith(">=") else row["ratio"] <= 0.1
    return table


def section(*, quick: bool = False, workdir: Path | None = None) -> list[dict]:
    """bench/scale.py's entry: the rows, for mobillama-0.5b (sync only: the async row would need
    ~26 GB) or, quick, for bench/mid-cpu.yaml with the async row."""
    model = str(Path(__file__).resolve().parent / "mid-cpu.yaml") if quick else "mobillama-0.5b"
    return rows(measure(model=model, workdir=workdir, with_async=quick))


def print_rows(table: list[dict], figures: dict) -> None:
    for row in table:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        print(f"{row['name']:66s} {row['measured']:8.3g}  anchor {row['anchor']:>26s}  ratio {ratio:>6s}  "
              f"goal {row['goal']:7s} {'' if row['met'] is None else 'met' if row['met'] else 'NOT MET'}")
    print(f"(load average {figures['load_average']:.1f} on {figures['cores']} cores)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mobillama-0.5b", help="a name in configs/ or a model YAML")
    parser.add_argument("--workdir", type=Path, default=None, help="on the disk to measure (default: $TMPDIR)")
    parser.add_argument("--no-async", action="store_true", help="skip the async row (it needs ~3x the state in RAM)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(model=args.model, workdir=args.workdir, with_async=not args.no_async)
    table = rows(figures)
    print(json.dumps({"figures": figures, "rows": table})) if args.json else print_rows(table, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
