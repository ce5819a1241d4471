"""The printed table (the layout of the paper's Table 4) and the JSON record of one evaluation."""

from __future__ import annotations

import datetime
import math
from typing import Any

from megamobi.eval.runner import TaskRun
from megamobi.eval.suite import PAPER_ROWS, suite_task


def headline(run: TaskRun) -> tuple[str, str | None]:
    """(column name, metric) of a task: the paper's choice for suite tasks, else acc_norm/acc/the first."""
    entry = suite_task(run.task)
    if entry is not None:
        return entry.column, entry.metric
    for metric in ("acc", "acc_norm"):
        if metric in run.metrics:
            return run.task, metric
    return run.task, next(iter(run.metrics), None)


def table_rows(runs: list[TaskRun], *, model_name: str, params: str) -> dict[str, Any]:
    columns, row = [], {}
    for run in runs:
        column, metric = headline(run)
        columns.append(column)
        value = run.metrics.get(metric) if run.status == "ok" and metric else None
        row[column] = None if value is None else 100.0 * value
    ran = [c for c in columns if row[c] is not None]
    rows = [{"model": model_name, "params": params, "scores": row,
             "average": sum(row[c] for c in ran) / len(ran) if ran else None}]
    for name, ref in PAPER_ROWS.items():
        scores = {c: ref["scores"].get(c) for c in columns}
        have = [scores[c] for c in ran if scores[c] is not None]
        rows.append({"model": name, "params": ref["params"], "scores": scores,
                     "average": sum(have) / len(have) if ran and len(have) == len(ran) else None,
                     "paper_average_nine_tasks": ref["average"]})
    return {"columns": columns, "averaged_over": ran, "rows": rows}


def format_table(table: dict[str, Any]) -> str:
    columns = ["Model Name", "#Params", *table["columns"], "Average"]

    def cell(value) -> str:
        if value is None:
            return "n/a"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [[row["model"], row["params"], *(cell(row["scores"][c]) for c in table["columns"]), cell(row["average"])]
             for row in table["rows"]]
    widths = [max(len(columns[i]), *(len(line[i]) for line in lines)) for i in range(len(columns))]
    fmt = lambda parts: "| " + " | ".join(p.ljust(w) if i < 2 else p.rjust(w)  # noqa: E731
                                          for i, (p, w) in enumerate(zip(parts, widths))) + " |"
    out = [fmt(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(line) for line in lines)]
    averaged = ", ".join(table["averaged_over"]) or "none"
    paper = ", ".join(f"{r['model'].split(' (')[0]} {r['paper_average_nine_tasks']:.2f}" for r in table["rows"][1:])
    out.append(f"Average over the tasks that ran ({averaged}); the paper's nine-task averages: {paper}. "
               "Scores are percent; CrowsPairs is pct_stereotype (lower is less biased).")
    return "\n".join(out)


def format_params(params: int | None) -> str:
    if params is None:
        return "?"
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


def software_versions() -> dict[str, str]:
    import importlib.metadata

    from megamobi.version import code_version

    versions = {"megamobi": code_version()}
    for package in ("lm_eval", "transformers", "torch", "datasets", "accelerate"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def build_record(*, runs: list[TaskRun], provenance: dict[str, Any], params: int | None,
                 settings: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    return _finite({
        "format": "megamobi-eval", "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {**provenance, "params_unique": params},
        "settings": settings,
        "software": software_versions(),
        "tasks": {run.task: run.to_json() for run in runs},
        "missing_datasets": [{"task": r.task, "dataset": r.dataset, "message": r.message}
                             for r in runs if r.status == "missing_dataset"],
        "failed": [{"task": r.task, "message": r.message} for r in runs if r.status == "failed"],
        "table": table,
    })
