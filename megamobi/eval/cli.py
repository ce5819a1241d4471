"""`python -m megamobi.eval`: downstream benchmarks through the LM Evaluation Harness (docs/eval.md).

    python -m megamobi.eval --checkpoint runs/x/checkpoints/step_0002015 --suite paper --output results.json
    python -m megamobi.eval --checkpoint hf/step_0002015 --tasks hellaswag,piqa --limit 100
    python -m megamobi.eval --checkpoints runs/x --every 10000 --suite paper      # -> runs/x/eval.csv
    python -m megamobi.eval --download --suite paper        # on a connected machine: fill the datasets cache

(`python -m megamobi.evaluate` is the other tool: loss and perplexity on token shards.)
Exit status: 0 when every task ran, 1 when some task could not run or a sweep skipped a checkpoint it
could not read (the others' results are still written), 2 for a mistake in the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from megamobi.eval.model_source import EvalError, check_model_path, default_cache_dir, resolve_model
from megamobi.eval.suite import PAPER_SUITE, suite_task

PROG = "python -m megamobi.eval"


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; one line is easier to read in a job log
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive whole number")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--checkpoint", help="megamobi checkpoint directory (any TP/PP layout) or Hugging Face model directory")
    what.add_argument("--checkpoints", metavar="RUN_DIR", help="evaluate every checkpoint of a run -> eval.csv (resumable)")
    what.add_argument("--download", action="store_true",
                      help="only load the tasks, downloading their datasets into the cache (run on a connected machine)")
    tasks = p.add_mutually_exclusive_group()
    tasks.add_argument("--suite", choices=["paper"], help="the paper's nine benchmarks with its shots (the default)")
    tasks.add_argument("--tasks", help="comma-separated lm-eval task names (suite tasks keep the paper's shots)")
    p.add_argument("--num-fewshot", type=int, help="override the shots of every task (default: the paper's, else 0)")
    p.add_argument("--every", type=_positive_int, metavar="K",
                   help="with --checkpoints: only checkpoints at least K steps after the previous one evaluated")
    p.add_argument("--limit", type=_positive_int, help="at most N documents per task (for quick checks, not for reporting)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute precision (auto: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--output", help="results JSON (default eval-<run>-<step>.json, or eval-<directory>.json for an HF "
                                    "directory); with --checkpoints the CSV (default RUN_DIR/eval.csv, per-checkpoint "
                                    "JSON beside it in eval/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --output JSON that holds another checkpoint's results")
    p.add_argument("--include-path", action="append", metavar="DIR",
                   help="directory of extra lm-eval task YAML files (repeat for several)")
    p.add_argument("--tokenizer", help="SentencePiece .model for a megamobi checkpoint (default: the one its data names)")
    p.add_argument("--cache-dir", help="where to export a megamobi checkpoint for lm-eval "
                                       "(default <checkpoints>/.hf-eval/<step>)")
    p.add_argument("--keep-hf", action="store_true", help="with --checkpoints: keep each exported HF directory")
    p.add_argument("--log-samples", action="store_true", help="also write every request's log-likelihoods "
                                                              "to <output>.samples.jsonl")
    p.add_argument("--verbose", action="store_true", help="lm-eval's own INFO logging")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not (args.checkpoint or args.checkpoints or args.download):
        raise EvalError("pass --checkpoint DIR, --checkpoints RUN_DIR or --download")
    if args.every is not None and not args.checkpoints:
        raise EvalError("--every only applies with --checkpoints RUN_DIR")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvalError(f"--num-fewshot {args.num_fewshot}: must be 0 or more")
    if args.overwrite and not args.checkpoint:
        raise EvalError("--overwrite only applies with --checkpoint (a sweep never replaces results)")
    for flag, value in (("--checkpoint", args.checkpoint), ("--checkpoints", args.checkpoints),
                        *(("--include-path", path) for path in args.include_path or ())):
        if value is None:
            continue
        if not Path(value).exists():
            raise EvalError(f"{flag} {value}: no such directory")
        if not Path(value).is_dir():
            raise EvalError(f"{flag} {value}: is a file; pass a directory")
    if args.checkpoints and not (Path(args.checkpoints) / "checkpoints").is_dir():
        raise EvalError(f"--checkpoints {args.checkpoints}: not a run directory (no checkpoints/ inside)")
    if args.tokenizer is not None and not Path(args.tokenizer).is_file():
        raise EvalError(f"--tokenizer {args.tokenizer}: no such file")
    if args.output is not None and Path(args.output).is_dir():
        raise EvalError(f"--output {args.output}: is a directory; pass a file name")
    if args.device is not None:
        from megamobi.cli_support import UserError
        from megamobi.devices import check_device

        try:
            check_device(args.device)
        except UserError as err:
            raise EvalError(str(err)) from None


def default_output(checkpoint: Path) -> Path:
    """eval-<run>-<step>.json for RUN/checkpoints/step_*, else eval-<directory>.json, so two runs'
    step_0000040 do not share a name; when that name holds another checkpoint's results (two runs
    both called `run`), a digest of this checkpoint's path is added: a default never replaces them."""
    resolved = checkpoint.resolve()
    run = resolved.parent.parent.name if resolved.parent.name == "checkpoints" else ""
    stem = f"eval-{run}-{resolved.name}" if run else f"eval-{resolved.name}"
    output = Path(f"{stem}.json")
    if _results_owner(output) not in (None, resolved):
        output = Path(f"{stem}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}.json")
    return output


def _results_owner(output: Path) -> Path | None:
    """The checkpoint an existing results file is about (None: no such file); EvalError for a file that
    is not megamobi.eval's."""
    if not output.is_file():
        return None
    try:
        return Path(json.loads(output.read_text())["model"]["path"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        raise EvalError(f"--output {output}: exists and is not a megamobi.eval results file; choose another "
                        "--output, or pass --overwrite to replace it") from None


def check_output_owner(output: Path, *, checkpoint: Path, overwrite: bool) -> None:
    """Before any work: an existing results file of ANOTHER checkpoint is replaced only with --overwrite
    (the same checkpoint's earlier results are replaced, as a re-run means)."""
    if overwrite:
        return
    owner = _results_owner(output)
    if owner not in (None, checkpoint.resolve()):
        raise EvalError(f"--output {output}: holds the results of another checkpoint ({owner}); choose another "
                        "--output, or pass --overwrite to replace them")


def task_plan(args: argparse.Namespace, task_manager) -> list[tuple[str, int | None]]:
    """(task, shots) in order; unknown names are a command-line mistake, found before any model loads."""
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise EvalError("--tasks: no task names given")
        unknown = [n for n in names if n not in task_manager.all_tasks]
        if unknown:
            hint = "; pass --include-path DIR for your own task YAMLs" if not args.include_path else ""
            raise EvalError(f"--tasks: unknown lm-eval task {', '.join(unknown)} (`lm_eval ls tasks` lists them{hint})")
    else:
        names = [t.task for t in PAPER_SUITE]
    plan = []
    for name in names:
        entry = suite_task(name)
        shots = args.num_fewshot if args.num_fewshot is not None else (entry.num_fewshot if entry else 0)
        plan.append((name, shots))
    return plan


def _quiet_lm_eval(verbose: bool) -> None:
    if not verbose:
        for name in ("lm_eval", "lm-eval", "transformers", "datasets", "accelerate"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _say(message: str) -> None:
    print(f"[megamobi.eval] {message}", file=sys.stderr, flush=True)


def evaluate_checkpoint(checkpoint: Path, *, plan: list[tuple[str, int | None]], args: argparse.Namespace,
                        task_manager, cache_dir: Path | None = None,
                        export_kept: bool = True) -> tuple[dict[str, Any], list]:
    """Export (if needed), load, run each task; the JSON record and the per-task runs."""
    from megamobi.devices import check_device
    from megamobi.eval.report import build_record, format_params, table_rows
    from megamobi.eval.runner import load_lm, run_task

    source = resolve_model(checkpoint, tokenizer=args.tokenizer, cache_dir=cache_dir)
    if source.exported:
        kept = "reused next time" if export_kept else "deleted after this checkpoint (--keep-hf keeps it)"
        _say(f"exported {checkpoint} to {source.hf_dir} (fp32, for lm-eval's hf model; {kept})")
    device = check_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        lm = load_lm(source.hf_dir, device=device, dtype=dtype, batch_size=args.batch_size)
    except (OSError, ValueError, KeyError) as err:  # e.g. an HF directory without weights or tokenizer files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EvalError(f"{source.hf_dir}: lm-eval's hf model cannot load it: {first_line}") from err
    params = source.params if source.params is not None else sum(p.numel() for p in lm.model.parameters())
    runs = []
    for task, shots in plan:
        _say(f"{task}: {shots}-shot" + (f", at most {args.limit} documents" if args.limit else ""))
        run = run_task(lm, task=task, num_fewshot=shots, limit=args.limit, task_manager=task_manager,
                       log_samples=args.log_samples)
        if run.status != "ok":
            if args.verbose and run.detail:
                print(run.detail, file=sys.stderr)
            print(f"{PROG}: {run.message}", file=sys.stderr, flush=True)
        runs.append(run)
    name = source.provenance.get("model_name") or checkpoint.name
    step = source.provenance.get("step")
    table = table_rows(runs, model_name=f"{name}" + (f" step {step}" if step is not None else ""),
                       params=format_params(params))
    settings = {"tasks": [t for t, _ in plan], "num_fewshot": dict(plan), "limit": args.limit,
                "batch_size": args.batch_size, "device": device, "dtype": dtype, "include_path": args.include_path,
                "hf_dir": str(source.hf_dir)}
    record = build_record(runs=runs, provenance=source.provenance, params=params, settings=settings, table=table)
    del lm
    return record, runs


@functools.cache
def _task_manager(include_paths: tuple[str, ...]):
    """lm-eval's task index (it parses every task YAML it ships: seconds), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None)


def _lm_eval_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("lm_eval")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    from megamobi.files import write_json_atomic

    write_json_atomic(path, record)


def _write_samples(path: Path, runs: list) -> None:
    with open(path, "w") as f:
        for run in runs:
            for task, samples in run.samples.items():
                for sample in samples:
                    f.write(json.dumps({"task": task, "doc_id": sample.get("doc_id"), "target": sample.get("target"),
                                        "resps": sample.get("filtered_resps")}, default=str) + "\n")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    output = None
    if args.checkpoint:  # the cheap checks (what it is, which tokenizer, where to) before lm-eval indexes its tasks
        check_model_path(Path(args.checkpoint), tokenizer=args.tokenizer)
        output = Path(args.output) if args.output else default_output(Path(args.checkpoint))
        check_output_owner(output, checkpoint=Path(args.checkpoint), overwrite=args.overwrite)
    _quiet_lm_eval(args.verbose)
    from megamobi.eval.report import format_table

    task_manager = _task_manager(tuple(args.include_path or ()))
    plan = task_plan(args, task_manager)

    if args.download:
        from megamobi.eval.runner import download_task

        status = 0
        for task, _ in plan:
            result = download_task(task, task_manager=task_manager)
            print(f"{task}: {'ok, in the datasets cache' if result.status == 'ok' else result.message}")
            status = status or (result.status != "ok")
        return int(status)

    if args.checkpoints:
        from megamobi.eval.sweep import sweep

        run_dir = Path(args.checkpoints)
        csv_path = Path(args.output) if args.output else run_dir / "eval.csv"
        json_dir = csv_path.parent / "eval"

        def evaluate_one(checkpoint: Path, tasks: list[tuple[str, int]], record_name: str) -> dict[str, Any]:
            cache = Path(args.cache_dir) / checkpoint.name if args.cache_dir else default_cache_dir(checkpoint)
            existed = cache.exists()
            keep = args.keep_hf or existed
            try:
                record, _ = evaluate_checkpoint(checkpoint, plan=tasks, args=args, task_manager=task_manager,
                                                   cache_dir=cache, export_kept=keep)
            finally:
                if not keep:
                    shutil.rmtree(cache, ignore_errors=True)  # 2 GB per 0.5B checkpoint: do not keep hundreds
                    with contextlib.suppress(OSError):
                        cache.parent.rmdir()  # only when empty
            _write_json(json_dir / record_name, record)
            print(format_table(record["table"]), flush=True)
            return record

        result = sweep(run_dir, csv_path=csv_path, every=args.every, plan=plan, limit=args.limit,
                       lm_eval=_lm_eval_version(), evaluate=evaluate_one, report=_say)
        skipped = f"; {len(result.skipped)} checkpoints skipped ({', '.join(result.skipped)})" if result.skipped else ""
        _say(f"{result.rows_added} rows added to {csv_path}{skipped}")
        return 1 if result.skipped else 0

    checkpoint = Path(args.checkpoint)
    record, runs = evaluate_checkpoint(checkpoint, plan=plan, args=args, task_manager=task_manager,
                                       cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    _write_json(output, record)
    if args.log_samples:
        _write_samples(output.with_name(output.name + ".samples.jsonl"), runs)
    print(format_table(record["table"]), flush=True)
    _say(f"results in {output}")
    return 0 if all(r.status == "ok" for r in runs) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except EvalError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
