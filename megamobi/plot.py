"""Pictures of training runs from their RUN_DIR/metrics.jsonl (and benchmark scores from eval.csv).

    python -m megamobi.plot runs/demo                                   # -> runs/demo/plots/*.png
    python -m megamobi.plot runs/baseline1 runs/baseline2 runs/mobillama-0.5b --output plots/compare
    python -m megamobi.plot runs/x --eval runs/x/eval.csv               # + benchmark scores vs tokens

One PNG per figure, several runs on the same axes (one colour each): loss.png (training and validation
loss against tokens, log x), lr.png (both with a dotted line where each data stage after the first begins), grad_norm.png, throughput.png (tokens/s and MFU against steps;
MFU is n/a on CPU or without logging.peak_tflops) and, with --eval, benchmarks.png (`python -m
megamobi.eval --checkpoints RUN_DIR` writes eval.csv). matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

PROG = "python -m megamobi.plot"
FIG_SIZE_IN = (8.0, 5.0)
DPI = 100  # every PNG is FIG_SIZE_IN * DPI = 800 x 500 pixels; benchmarks.png with 3+ panels: 1200 wide, 350 per row


class PlotError(ValueError):
    """A user mistake: one line, exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def read_metrics(run_dir: Path) -> list[dict]:
    if not run_dir.exists():
        raise PlotError(f"{run_dir}: no such run directory")
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: is a file; pass a run directory (the trainer's run_dir)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{path}: not found; is {run_dir} a run directory that has logged at least one step?")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise PlotError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    if not any("loss" in r for r in rows):
        raise PlotError(f"{path}: no training steps logged yet")
    return sorted(rows, key=lambda r: r.get("step", 0))


def read_eval_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise PlotError(f"--eval {path}: no such file")
    if path.is_dir():
        raise PlotError(f"--eval {path}: is a directory; pass the eval.csv file")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "tokens" not in rows[0]:
        raise PlotError(f"--eval {path}: no rows with a tokens column (written by python -m megamobi.eval --checkpoints)")
    return rows


def _series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        value = r.get(y)
        if isinstance(value, (int, float)) and math.isfinite(value) and r.get(x) is not None:
            xs.append(r[x])
            ys.append(value)
    return xs, ys


def stage_boundaries(rows: list[dict]) -> list[dict]:
    """The data stages that began after step 1 (metrics.jsonl `data_stage_begins` records, docs/data.md):
    {"step": its first step, "consumed_tokens": tokens before it, "label": "stage 2 anneal"}."""
    marks = []
    for r in rows:
        number = r.get("data_stage_begins")
        if isinstance(number, int) and number >= 2 and r.get("step", 0) > 1:
            name = r.get("data_stage_name")
            marks.append({"step": r["step"], "consumed_tokens": r.get("consumed_tokens"),
                          "label": f"stage {number}" + (f" {name}" if name else "")})
    return marks


def _mark_stages(ax, marks: list[dict], *, x: str, color: str) -> None:
    """A dotted vertical line where each stage begins (between its first step and the one before), labelled."""
    for mark in marks:
        where = mark["consumed_tokens"] if x == "tokens" else mark["step"] - 0.5
        if where is None or where <= 0:
            continue
        ax.axvline(where, color=color, linestyle=":", linewidth=1.2)
        ax.text(where, 0.98, f" {mark['label']}", color=color, rotation=90, va="top", ha="left", fontsize="small",
                transform=ax.get_xaxis_transform())


def _figure(plt, rows=1):
    return plt.subplots(rows, 1, figsize=(FIG_SIZE_IN[0], FIG_SIZE_IN[1] * (1 if rows <= 2 else rows / 2)),
                        dpi=DPI, squeeze=False)


def _save(fig, path: Path, written: list[Path]) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the pixel size stays what FIG_SIZE_IN says
    written.append(path)


def _benchmark_column(column: str) -> bool:
    """eval.csv columns worth a panel: every metric of a custom task, the headline metric of a paper task."""
    if column in ("step", "tokens", "checkpoint") or "/" not in column:
        return False
    from megamobi.eval.suite import suite_task

    task, metric = column.split("/", 1)
    entry = suite_task(task)
    return entry is None or entry.metric == metric


def plot_runs(runs: dict[str, list[dict]], *, output: Path, evals: dict[str, list[dict[str, str]]] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {name: colors[i % len(colors)] for i, name in enumerate(runs)}
    written: list[Path] = []

    fig, axes = _figure(plt)
    ax = axes[0][0]
    for name, rows in runs.items():
        xs, ys = _series(rows, "consumed_tokens", "loss")
        ax.plot(xs, ys, color=color[name], label=f"{name} train")
        xs, ys = _series(rows, "consumed_tokens", "val_loss")
        if xs:
            ax.plot(xs, ys, "o--", color=color[name], label=f"{name} validation")
        _mark_stages(ax, stage_boundaries(rows), x="tokens", color=color[name])
    ax.set(xscale="log", xlabel="training tokens", ylabel="loss", title="loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, output / "loss.png", written)
    plt.close(fig)

    for key, label, file_name in (("lr", "learning rate", "lr.png"), ("grad_norm", "gradient norm", "grad_norm.png")):
        fig, axes = _figure(plt)
        ax = axes[0][0]
        for name, rows in runs.items():
            ax.plot(*_series(rows, "step", key), color=color[name], label=name)
            if key == "lr":
                _mark_stages(ax, stage_boundaries(rows), x="steps", color=color[name])
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        _save(fig, output / file_name, written)
        plt.close(fig)

    fig, axes = _figure(plt, rows=2)
    top, bottom = axes[0][0], axes[1][0]
    missing_mfu = []
    for name, rows in runs.items():
        top.plot(*_series(rows, "step", "tokens_per_s"), color=color[name], label=name)
        xs, ys = _series(rows, "step", "mfu")
        if xs:
            bottom.plot(xs, [100 * y for y in ys], color=color[name], label=name)
        else:
            missing_mfu.append(name)
    top.set(xlabel="step", ylabel="tokens/s (all devices)", title="throughput")
    bottom.set(xlabel="step", ylabel="MFU %", title="model FLOPs utilisation")
    if missing_mfu:
        bottom.text(0.5, 0.5, f"MFU n/a for {', '.join(missing_mfu)}\n(CPU run, or logging.peak_tflops not set)",
                    ha="center", va="center", transform=bottom.transAxes)
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    _save(fig, output / "throughput.png", written)
    plt.close(fig)

    if evals:
        columns = []
        for rows in evals.values():
            columns += [c for c in rows[0] if _benchmark_column(c) and c not in columns]
        # Up to two panels stacked at the usual size; more in a grid of three per row, 350 px high each.
        ncols = 1 if len(columns) <= 2 else 3
        nrows = max(1, math.ceil(len(columns) / ncols))
        size = FIG_SIZE_IN if ncols == 1 else (12.0, 3.5 * nrows)
        fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, squeeze=False)
        panels = [ax for row in axes for ax in row]
        for ax in panels[len(columns):]:
            ax.set_visible(False)
        for ax, column in zip(panels, columns):
            for name, rows in evals.items():
                points = [(float(r["tokens"]), 100 * float(r[column])) for r in rows if r.get(column) not in (None, "")]
                if points:
                    ax.plot(*zip(*points), "o-", color=color.get(name, colors[len(color) % len(colors)]), label=name)
            ax.set(xlabel="training tokens", ylabel="score %", title=column)
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
        _save(fig, output / "benchmarks.png", written)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--eval", nargs="+", metavar="CSV", help="eval.csv files (one per run, in the same order)")
    parser.add_argument("--output", help="directory for the PNGs (default: FIRST_RUN_DIR/plots)")
    args = parser.parse_args(argv)
    try:
        run_dirs = [Path(p) for p in args.run_dirs]
        names = [p.resolve().name for p in run_dirs]
        if len(set(names)) < len(names):  # two runs both called "run": label them by their full path
            names = [str(p) for p in run_dirs]
        runs = {name: read_metrics(path) for name, path in zip(names, run_dirs)}
        evals = None
        if args.eval:
            if len(args.eval) > len(run_dirs):
                raise PlotError(f"--eval: {len(args.eval)} files for {len(run_dirs)} runs; give at most one per run")
            evals = {name: read_eval_csv(Path(p)) for name, p in zip(names, args.eval)}
        output = Path(args.output) if args.output else run_dirs[0] / "plots"
        if output.exists() and not output.is_dir():
            raise PlotError(f"--output {output}: is a file; pass a directory")
        written = plot_runs(runs, output=output, evals=evals)
    except PlotError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
