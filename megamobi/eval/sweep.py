"""`--checkpoints RUN_DIR`: every checkpoint of a run, in step order, one row each in eval.csv.

Resumable: a checkpoint whose step already has a row is skipped, so re-running the same command after
an interruption (or after training wrote more checkpoints) evaluates only the new ones.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megamobi.eval.model_source import EvalError

FIXED_COLUMNS = ["step", "tokens", "checkpoint"]


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not set(FIXED_COLUMNS) <= set(rows[0]):
        raise EvalError(f"{csv_path}: not an eval.csv written by megamobi.eval (no step/tokens columns); "
                        "pass another --output")
    return rows


def write_rows(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    """The whole file, rewritten atomically: the header grows when a later checkpoint has more metrics."""
    columns = list(FIXED_COLUMNS)
    for row in rows:
        columns += [c for c in row if c not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(csv_path)


def csv_row(record: dict[str, Any], *, checkpoint: Path) -> dict[str, Any]:
    model = record["model"]
    row: dict[str, Any] = {"step": model.get("step"), "tokens": model.get("consumed_tokens"), "checkpoint": checkpoint.name}
    for task, result in record["tasks"].items():
        for metric, value in result["metrics"].items():
            row[f"{task}/{metric}"] = value
    return row


def checkpoints_to_evaluate(checkpoints: list[tuple[int, Path]], *, done_steps: set[int], every: int | None) -> list[Path]:
    """In step order; with `every`, only a checkpoint at least `every` steps after the previous one
    evaluated (earlier runs' rows included), so a resumed sweep picks the same checkpoints."""
    chosen, last = [], None
    for step, path in sorted(checkpoints):
        if step in done_steps:
            last = step
            continue
        if every is None or last is None or step - last >= every:
            chosen.append(path)
            last = step
    return chosen


def sweep(run_dir: Path, *, csv_path: Path, every: int | None,
          evaluate: Callable[[Path], dict[str, Any] | None], report: Callable[[str], None]) -> int:
    """Evaluate the run's complete checkpoints not yet in csv_path; returns how many rows were added."""
    from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest

    checkpoints = [(int(read_manifest(p)["step"]), p) for p in complete_checkpoints(run_dir)]
    if not checkpoints:
        raise EvalError(f"--checkpoints {run_dir}: no complete checkpoints in {run_dir}/checkpoints")
    rows = read_rows(csv_path)
    done = {int(r["step"]) for r in rows if r.get("step", "").strip()}
    todo = checkpoints_to_evaluate(checkpoints, done_steps=done, every=every)
    report(f"{run_dir}: {len(checkpoints)} checkpoints, {len(done)} already in {csv_path}, {len(todo)} to evaluate")
    added = 0
    for path in todo:
        record = evaluate(path)
        if record is None or not any(t["status"] == "ok" for t in record["tasks"].values()):
            report(f"{path.name}: no task ran; no row written (re-run to retry)")
            continue
        rows.append(csv_row(record, checkpoint=path))
        rows.sort(key=lambda r: int(r["step"]))
        write_rows(csv_path, rows)
        added += 1
    return added
