"""`--checkpoints RUN_DIR`: every checkpoint of a run, in step order, into eval.csv.

One row per (checkpoint, task, shots, limit, lm-eval version), the key of a result: its metrics are
columns (`acc`, `acc_norm`, ..., each with its `*_stderr`), so a result is reused only when all five
match and a change of any of them adds rows instead of mixing other settings into the same series.
Re-running the same command after an interruption (or after training wrote more checkpoints)
evaluates only what is missing; another `--tasks`, `--limit` or `--num-fewshot` evaluates just that.

A checkpoint that cannot be evaluated (damaged, incomplete, unreadable) is reported in one warning
line and skipped; the sweep goes on with the next one and ends with exit status 1.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megamobi.cli_support import UserError
from megamobi.config_io import ConfigError
from megamobi.eval.model_source import EvalError

KEY_COLUMNS = ["checkpoint", "task", "num_fewshot", "limit", "lm_eval"]
FIXED_COLUMNS = ["step", "tokens", "checkpoint", "task", "num_fewshot", "limit", "lm_eval", "task_version", "run_dir"]

Plan = list[tuple[str, int]]  # (task, shots) in order


@dataclass
class SweepResult:
    checkpoints: int = 0
    rows_added: int = 0
    skipped: list[str] = field(default_factory=list)  # checkpoint names that could not be evaluated


def result_key(*, checkpoint: str, task: str, shots: int, limit: int | None, lm_eval: str) -> tuple[str, ...]:
    return (checkpoint, task, str(shots), "" if limit is None else str(limit), lm_eval)


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(row.get(column) or "") for column in KEY_COLUMNS)


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    if not csv_path.is_file():
        return []
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames or []
    if not header:
        return []
    if not set(FIXED_COLUMNS) <= set(header):
        old = {"step", "tokens", "checkpoint"} <= set(header)
        why = ("written by an older megamobi.eval, one row per checkpoint without the task, shots, limit and "
               "lm-eval version of its numbers, so they cannot be matched to settings" if old
               else "not an eval.csv written by megamobi.eval --checkpoints")
        raise EvalError(f"{csv_path}: {why}; move it aside or pass another --output")
    return rows


def check_same_run(rows: list[dict[str, str]], *, run_dir: Path, csv_path: Path) -> None:
    """An eval.csv holds one run: checkpoint names repeat across runs, so another run's rows would be
    taken for this one's (a recorded run directory that no longer exists was moved: accepted)."""
    here = run_dir.resolve()
    for recorded in sorted({r.get("run_dir") or "" for r in rows} - {"", str(here)}):
        if Path(recorded).is_dir() and Path(recorded).resolve() != here:
            raise EvalError(f"--output {csv_path}: holds the results of another run ({recorded}); give this run "
                            f"its own file (the default is {run_dir / 'eval.csv'})")


def write_rows(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    """The whole file, rewritten atomically: new metric columns are appended to the header."""
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


def csv_rows(record: dict[str, Any], *, checkpoint: Path, run_dir: Path, limit: int | None,
             lm_eval: str) -> list[dict[str, Any]]:
    """One row per task that ran: the key, the task's version, every metric and its stderr."""
    model, rows = record["model"], []
    for task, result in record["tasks"].items():
        if result["status"] != "ok":
            continue  # no row: the next sweep retries it
        row: dict[str, Any] = {"step": model.get("step"), "tokens": model.get("consumed_tokens"),
                               "checkpoint": checkpoint.name, "task": task, "num_fewshot": result["num_fewshot"],
                               "limit": "" if limit is None else limit, "lm_eval": lm_eval,
                               "task_version": (result.get("versions") or {}).get(task, ""),
                               "run_dir": str(run_dir.resolve())}
        for metric, value in result["metrics"].items():
            row[metric] = value
            stderr = (result.get("stderr") or {}).get(metric)
            if stderr is not None:
                row[f"{metric}_stderr"] = stderr
        rows.append(row)
    return rows


def record_name(checkpoint: str, plan: Plan, *, limit: int | None, lm_eval: str) -> str:
    """eval/<checkpoint>.<digest>.json: one file per checkpoint and settings, so a later sweep with
    other tasks or settings never replaces an earlier one's record."""
    settings = json.dumps({"plan": plan, "limit": limit, "lm_eval": lm_eval}, sort_keys=True)
    return f"{checkpoint}.{hashlib.sha256(settings.encode()).hexdigest()[:10]}.json"


def select_checkpoints(checkpoints: list[tuple[int, Path]], *, evaluated_steps: set[int],
                       every: int | None) -> list[Path]:
    """In step order; with `every`, only a checkpoint at least `every` steps after the previous one
    chosen, where checkpoints with results for these settings are chosen again (earlier sweeps'
    choices), so an interrupted or extended sweep picks what an uninterrupted one would have."""
    chosen, last = [], None
    for step, path in sorted(checkpoints, key=lambda item: item[0]):
        if step in evaluated_steps or every is None or last is None or step - last >= every:
            chosen.append(path)
            last = step
    return chosen


def list_checkpoints(run_dir: Path, *, report: Callable[[str], None], result: SweepResult) -> list[tuple[int, Path]]:
    """(step, directory) of the run's complete checkpoints; one with a damaged manifest is a warning."""
    from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest

    found = []
    for path in complete_checkpoints(run_dir):
        try:
            step = read_manifest(path).get("step")
        except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            step, why = None, f"unreadable megamobi.json ({err})"
        else:
            why = "its megamobi.json records no step"
        if not isinstance(step, int):
            report(f"warning: {path.name}: skipped: {why}; the sweep goes on")
            result.skipped.append(path.name)
            continue
        found.append((step, path))
    return found


def sweep(run_dir: Path, *, csv_path: Path, every: int | None, plan: Plan, limit: int | None, lm_eval: str,
          evaluate: Callable[[Path, Plan, str], dict[str, Any]], report: Callable[[str], None]) -> SweepResult:
    """Evaluate what csv_path lacks of `plan` on the run's complete checkpoints. `evaluate(checkpoint,
    plan, record_name)` returns the JSON record, or raises EvalError (or the shared ConfigError /
    UserError of the checkpoint readers) for a checkpoint it cannot use."""
    result = SweepResult()
    checkpoints = list_checkpoints(run_dir, report=report, result=result)
    if not checkpoints and not result.skipped:
        raise EvalError(f"--checkpoints {run_dir}: no complete checkpoints in {run_dir}/checkpoints")
    result.checkpoints = len(checkpoints)
    rows = read_rows(csv_path)
    check_same_run(rows, run_dir=run_dir, csv_path=csv_path)
    done = {row_key(r) for r in rows}

    def missing(path: Path) -> Plan:
        return [(task, shots) for task, shots in plan
                if result_key(checkpoint=path.name, task=task, shots=shots, limit=limit, lm_eval=lm_eval) not in done]

    evaluated = {step for step, path in checkpoints if len(missing(path)) < len(plan)}
    todo = [(path, missing(path)) for path in select_checkpoints(checkpoints, evaluated_steps=evaluated, every=every)]
    todo = [(path, tasks) for path, tasks in todo if tasks]
    already = sum(len(plan) - len(missing(path)) for _, path in checkpoints)
    report(f"{run_dir}: {len(checkpoints)} checkpoints, {already} (checkpoint, task) results with these settings "
           f"already in {csv_path}, {len(todo)} checkpoints to evaluate")
    for path, tasks in todo:
        try:
            record = evaluate(path, tasks, record_name(path.name, tasks, limit=limit, lm_eval=lm_eval))
        except (EvalError, ConfigError, UserError) as err:  # whichever reader refused this checkpoint
            report(f"warning: {path.name}: skipped: {err}; the sweep goes on (re-run to retry)")
            result.skipped.append(path.name)
            continue
        new = csv_rows(record, checkpoint=path, run_dir=run_dir, limit=limit, lm_eval=lm_eval)
        if not new:
            report(f"{path.name}: no task ran; no row written (re-run to retry)")
            continue
        rows += new
        rows.sort(key=lambda r: (int(r["step"]), row_key(r)))
        write_rows(csv_path, rows)
        result.rows_added += len(new)
    return result
