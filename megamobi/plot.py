"""Pictures of training runs from their RUN_DIR/metrics.jsonl (and benchmark scores from eval.csv).

    python -m megamobi.plot runs/demo                                   # -> runs/demo/plots/*.png
    python -m megamobi.plot runs/baseline1 runs/baseline2 runs/mobillama-0.5b --output plots/compare
    python -m megamobi.plot runs/x --eval runs/x/eval.csv               # + benchmark scores vs tokens

One PNG per figure, several runs on the same axes (one colour each): loss.png (training and validation
loss against tokens, log x), lr.png (both with a dotted line where each data stage after the first
begins), grad_norm.png, throughput.png (tokens/s against steps, and MFU when a run logged it: a CPU
run or one without logging.peak_tflops has no GPU peak, and the figure says so once instead of
drawing an empty panel) and, with --eval, benchmarks.png (`python -m megamobi.eval --checkpoints
RUN_DIR` writes eval.csv: one line per run and setting, never mixed). Every input is read and checked
before any PNG is written. matplotlib's Agg backend: no display needed.
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


EVAL_SETTINGS = ("num_fewshot", "limit", "lm_eval", "task_version")  # with the task: one series never mixes them


def _number(text: str, *, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise PlotError(f"{where}: column {column}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise PlotError(f"{where}: column {column}: {text} is not a finite number")
    return value


def read_eval_csv(path: Path) -> list[dict]:
    """eval.csv rows as {"tokens", "task", "settings", "metrics": {name: value}}; a PlotError naming
    the file, line and column for anything that is not what megamobi.eval --checkpoints writes."""
    if not path.exists():
        raise PlotError(f"--eval {path}: no such file")
    if path.is_dir():
        raise PlotError(f"--eval {path}: is a directory; pass the eval.csv file")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            lines = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise PlotError(f"--eval {path}: not a CSV file ({err})") from None
    if "tokens" not in header or "task" not in header:
        old = "tokens" in header and any("/" in c for c in header)
        raise PlotError(f"--eval {path}: " + ("written by an older megamobi.eval (one column per task metric, without "
                                              "the settings of each number); re-run python -m megamobi.eval --checkpoints"
                                              if old else "no tokens and task columns (written by python -m "
                                              "megamobi.eval --checkpoints)"))
    from megamobi.eval.sweep import FIXED_COLUMNS

    metrics = [c for c in header if c not in FIXED_COLUMNS and not c.endswith("_stderr")]
    if not metrics:
        raise PlotError(f"--eval {path}: no metric column (acc, acc_norm, ...): nothing to plot")
    rows = []
    for number, line in enumerate(lines, start=2):
        where = f"--eval {path}:{number}"
        if None in line:
            raise PlotError(f"{where}: more cells than the header has columns")
        if not (line.get("task") or "").strip():
            raise PlotError(f"{where}: column task: empty")
        values = {m: _number(line[m], where=where, column=m) for m in metrics if (line.get(m) or "").strip()}
        rows.append({"tokens": _number(line.get("tokens") or "", where=where, column="tokens"), "task": line["task"],
                     "settings": tuple((s, line.get(s) or "") for s in EVAL_SETTINGS), "metrics": values})
    if not any(r["metrics"] for r in rows):
        raise PlotError(f"--eval {path}: no metric values in any row: nothing to plot")
    return rows


def _settings_text(settings: tuple[tuple[str, str], ...]) -> str:
    s = dict(settings)
    parts = [f"{s['num_fewshot']}-shot" if s["num_fewshot"] else "", f"limit {s['limit']}" if s["limit"] else "",
             f"lm-eval {s['lm_eval']}" if s["lm_eval"] else "", f"task v{s['task_version']}" if s["task_version"] else ""]
    return ", ".join(p for p in parts if p)


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


def _benchmark_panel(task: str, metric: str) -> bool:
    """Worth a panel: every metric of a custom task, the headline metric of a paper task."""
    from megamobi.eval.suite import suite_task

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

    # MFU needs the GPU's peak (logging.peak_tflops, or one detected on a GPU): without it there is no
    # MFU panel at all, and the throughput title says so once.
    missing_mfu = [name for name, rows in runs.items() if not _series(rows, "step", "mfu")[0]]
    with_mfu = len(missing_mfu) < len(runs)
    fig, axes = _figure(plt, rows=2 if with_mfu else 1)
    top = axes[0][0]
    for name, rows in runs.items():
        top.plot(*_series(rows, "step", "tokens_per_s"), color=color[name], label=name)
    no_peak = f"MFU n/a for {', '.join(missing_mfu)}: no GPU peak known (CPU run, or logging.peak_tflops not set)"
    top.set(xlabel="step", ylabel="tokens/s (all devices)", title="throughput" + ("" if with_mfu else f"\n{no_peak}"))
    panels = [top]
    if with_mfu:
        bottom = axes[1][0]
        for name, rows in runs.items():
            xs, ys = _series(rows, "step", "mfu")
            if xs:
                bottom.plot(xs, [100 * y for y in ys], color=color[name], label=name)
        bottom.set(xlabel="step", ylabel="MFU %", title="model FLOPs utilisation" + (f"\n{no_peak}" if missing_mfu else ""))
        panels.append(bottom)
    for ax in panels:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    _save(fig, output / "throughput.png", written)
    plt.close(fig)

    if evals:
        columns = []  # (task, metric) per panel, in the order met
        for rows in evals.values():
            for r in rows:
                columns += [(r["task"], m) for m in r["metrics"]
                            if _benchmark_panel(r["task"], m) and (r["task"], m) not in columns]
        # Up to two panels stacked at the usual size; more in a grid of three per row, 350 px high each.
        ncols = 1 if len(columns) <= 2 else 3
        nrows = max(1, math.ceil(len(columns) / ncols))
        size = FIG_SIZE_IN if ncols == 1 else (12.0, 3.5 * nrows)
        fig, axes = plt.subplots(nrows, ncols, figsize=size, dpi=DPI, squeeze=False)
        panels = [ax for row in axes for ax in row]
        for ax in panels[len(columns):]:
            ax.set_visible(False)
        for ax, (task, metric) in zip(panels, columns):
            # One line per run and settings (shots, limit, lm-eval and task version): never mixed.
            series: dict[tuple, list[tuple[float, float]]] = {}
            for name, rows in evals.items():
                for r in rows:
                    if r["task"] == task and metric in r["metrics"]:
                        series.setdefault((name, r["settings"]), []).append((r["tokens"], 100 * r["metrics"][metric]))
            settings = {key[1] for key in series}
            styles = {s: style for s, style in zip(sorted(settings), ("o-", "s--", "^:", "d-.") * len(settings))}
            for (name, setting), points in series.items():
                label = name if len(settings) == 1 else f"{name} ({_settings_text(setting)})"
                ax.plot(*zip(*sorted(points)), styles[setting], label=label,
                        color=color.get(name, colors[len(color) % len(colors)]))
            title = f"{task}/{metric}" + (f"\n{_settings_text(next(iter(settings)))}" if len(settings) == 1 else "")
            ax.set(xlabel="training tokens", ylabel="score %", title=title)
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
