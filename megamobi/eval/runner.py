"""Run lm-eval tasks one at a time on one loaded model, so one task's missing dataset or failure is
reported in one line and the other tasks still run."""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What `datasets` raises for a dataset it cannot get: offline mode with no cached copy
# (ConnectionError "Couldn't reach 'X' on the Hub (OfflineModeIsEnabled)"), not on the Hub, or a
# local data file that is not there.
_MISSING_PATTERNS = (
    re.compile(r"Couldn't reach '([^']+)'"),
    re.compile(r"Dataset '([^']+)' doesn't exist"),
    re.compile(r"Unable to find '([^']+)'"),
)


@dataclass
class TaskRun:
    task: str
    num_fewshot: int | None
    status: str                       # "ok", "missing_dataset" or "failed"
    message: str = ""
    dataset: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    n_shot: dict[str, int] = field(default_factory=dict)
    n_samples: dict[str, Any] = field(default_factory=dict)
    subtasks: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: dict[str, list] = field(default_factory=dict)
    detail: str = ""                  # the traceback of a failed task, shown with --verbose

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("samples", "detail")}


def fetch_command(task: str) -> str:
    return f"python -m megamobi.eval --download --tasks {task}"


def missing_dataset_of(err: BaseException, *, task: str, task_manager) -> str | None:
    """The dataset a loading error is about, or None when the error is something else."""
    text = str(err)
    names = {type(e).__name__ for e in _chain(err)}
    offline = "OfflineModeIsEnabled" in text or names & {"DatasetNotFoundError", "OfflineModeIsEnabled",
                                                          "LocalEntryNotFoundError", "EmptyDatasetError"}
    if not (offline or isinstance(err, (ConnectionError, FileNotFoundError))):
        return None
    for pattern in _MISSING_PATTERNS:
        if match := pattern.search(text):
            return match.group(1)
    entry = task_manager.task_index.get(task)
    cfg = (entry.cfg or {}) if entry is not None else {}
    if cfg.get("dataset_path"):
        return cfg["dataset_path"] + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "")
    return task


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


def _is_local_file(dataset: str) -> bool:
    return dataset.startswith(("/", "./", "../")) or Path(dataset).suffix in (".json", ".jsonl", ".csv", ".parquet")


def missing_message(task: str, dataset: str) -> str:
    if _is_local_file(dataset):
        return (f"task {task}: data file {dataset} not found; fix data_files in the task's YAML "
                "(a relative path is relative to the working directory)")
    return (f"task {task}: dataset {dataset} is not in the datasets cache and this machine is offline; "
            f"on a connected machine run `{fetch_command(task)}` (or any lm-eval run of {task}), then copy its "
            "Hugging Face datasets cache (~/.cache/huggingface/datasets, or $HF_DATASETS_CACHE) here")


def load_lm(hf_dir, *, device: str, dtype: str, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(hf_dir), device=device, dtype=dtype, batch_size=batch_size)


def run_task(lm, *, task: str, num_fewshot: int | None, limit: int | None, task_manager,
             log_samples: bool = False) -> TaskRun:
    from lm_eval import simple_evaluate

    try:
        out = simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                              log_samples=log_samples)
    except Exception as err:  # every task failure is reported; the others still run
        dataset = missing_dataset_of(err, task=task, task_manager=task_manager)
        if dataset is not None:
            return TaskRun(task=task, num_fewshot=num_fewshot, status="missing_dataset", dataset=dataset,
                           message=missing_message(task, dataset))
        first_line = (str(err).strip().splitlines() or [""])[0]
        return TaskRun(task=task, num_fewshot=num_fewshot, status="failed",
                       message=f"task {task}: {type(err).__name__}: {first_line}", detail=traceback.format_exc())
    return _task_run(out, task=task, num_fewshot=num_fewshot)


def _split_metrics(values: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    metrics, stderr = {}, {}
    for key, value in values.items():
        if "," not in key:
            continue  # "alias", "name", ...
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            name = metric[: -len("_stderr")] + ("" if filter_name == "none" else f"/{filter_name}")
            stderr[name] = value if isinstance(value, (int, float)) else None
        elif isinstance(value, (int, float)):
            metrics[metric + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    return metrics, stderr


def _task_run(out: dict[str, Any], *, task: str, num_fewshot: int | None) -> TaskRun:
    results = out["results"]
    metrics, stderr = _split_metrics(results.get(task, {}))
    subtasks = {name: _split_metrics(values)[0] for name, values in results.items() if name != task}
    higher = out.get("higher_is_better", {}).get(task, {})
    return TaskRun(task=task, num_fewshot=num_fewshot, status="ok", metrics=metrics, stderr=stderr,
                   higher_is_better={k: bool(v) for k, v in higher.items() if v is not None},
                   versions=dict(out.get("versions", {})), n_shot=dict(out.get("n-shot", {})),
                   n_samples=dict(out.get("n-samples", {})), subtasks=subtasks,
                   samples=dict(out.get("samples", {})))


def download_task(task: str, *, task_manager) -> TaskRun:
    """Load a task (downloading its datasets into the cache when online); what `--download` runs."""
    try:
        task_manager.load([task])
    except Exception as err:
        dataset = missing_dataset_of(err, task=task, task_manager=task_manager)
        if dataset is not None:
            message = (missing_message(task, dataset) if _is_local_file(dataset) else
                       f"task {task}: dataset {dataset} could not be fetched (offline or not on the Hub): "
                       f"{(str(err).splitlines() or [''])[0]}")
            return TaskRun(task=task, num_fewshot=None, status="missing_dataset", dataset=dataset, message=message)
        return TaskRun(task=task, num_fewshot=None, status="failed", message=f"task {task}: {type(err).__name__}: {err}")
    return TaskRun(task=task, num_fewshot=None, status="ok")
