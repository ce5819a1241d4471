"""python -m megamobi.plan --config RUN.yaml --nodes N --gpus-per-node G --gpu a100-80gb [--top 10] [--json]
[--for-run RUN_DIR]: every layout of the run on that cluster, with per-GPU memory and tokens/s, best first,
then the run's schedule (its data stages' steps and tokens, the lr at each one's start and end)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megamobi.cli_support import positive_float, positive_int
from megamobi.config_io import ConfigError
from megamobi.plan.catalogue import CATALOGUE, gpu_with_overrides
from megamobi.plan.planner import plan
from megamobi.plan.report import check_for_run, print_for_run, print_json, print_text
from megamobi.plan.timing import DEFAULT_COMPUTE_FRACTION
from megamobi.training.run_config import load_run_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage too)
        print(f"python -m megamobi.plan: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _fraction(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be within (0, 1], got {text}")
    return value


def _file(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give the run's YAML file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def _run_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory; give the run_dir that holds metrics.jsonl")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m megamobi.plan", description=__doc__)
    p.add_argument("--config", required=True, type=_file, help="the run's YAML (its data need not be on this machine)")
    p.add_argument("--nodes", required=True, type=positive_int)
    p.add_argument("--gpus-per-node", required=True, type=positive_int)
    p.add_argument("--gpu", required=True, choices=sorted(CATALOGUE), help="catalogue entry; see docs/planning.md")
    p.add_argument("--top", type=positive_int, default=None, help="rows to show (default 10; --json: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per candidate and line, best first")
    p.add_argument("--for-run", type=_run_dir, default=None, metavar="RUN_DIR",
                   help="compare this config's layout with what RUN_DIR/metrics.jsonl measured")
    p.add_argument("--peak-tflops", type=positive_float, help="override the GPU's dense bf16 peak (TFLOP/s)")
    p.add_argument("--memory-gb", type=positive_float, help="override the GPU's memory (GiB)")
    p.add_argument("--intra-gbps", type=positive_float, help="override NVLink bandwidth (GB/s per GPU, one way)")
    p.add_argument("--inter-gbps", type=positive_float, help="override InfiniBand bandwidth (GB/s per GPU, one way)")
    p.add_argument("--compute-fraction", type=_fraction, default=DEFAULT_COMPUTE_FRACTION,
                   help=f"achievable share of peak in compute (default {DEFAULT_COMPUTE_FRACTION})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    gpu = gpu_with_overrides(args.gpu, peak_tflops=args.peak_tflops, memory_gib=args.memory_gb,
                             intra_gbps=args.intra_gbps, inter_gbps=args.inter_gbps)
    try:
        run = load_run_config(args.config, check_data=False)
        result = plan(run, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu=gpu,
                      compute_fraction=args.compute_fraction)
        measured = check_for_run(run, result, args.for_run) if args.for_run is not None else None
        if args.json:
            print_json(run, result, top=args.top)
        else:
            print_text(run, result, gpu=gpu, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       top=args.top or 10, compute_fraction=args.compute_fraction)
            from megamobi.training.schedule_table import schedule_lines

            print("\n".join(["", *schedule_lines(run)]))  # data stages and lr, as --check-only prints them
        if args.for_run is not None:
            print_for_run(result, args.for_run, measured, as_json=args.json)
    except ConfigError as err:
        print(f"python -m megamobi.plan: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        sys.stderr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
