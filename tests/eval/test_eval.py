"""`python -m megamobi.eval` on a checkpoint trained here: the numbers are the model's own, the stock
`lm_eval --model hf` CLI agrees on the exported checkpoint, offline gaps are one line, sweeps resume."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TASK_DIR

from megamobi.eval.cli import main as eval_main
from megamobi.eval.model_source import resolve_model
from megamobi.eval.suite import PAPER_SUITE
from megamobi.eval.sweep import result_key, row_key, select_checkpoints
from megamobi.plot import main as plot_main

CKPT = "checkpoints/step_0000006"


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No network and an empty Hugging Face cache: only local datasets can load."""
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
            "TOKENIZERS_PARALLELISM": "false"}


def test_accuracy_is_the_models_own_and_a_missing_dataset_is_one_line(
        tmp_path, trained_run, eval_tokenizer, own_loglikelihoods, repo_root):
    import lm_eval

    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "megamobi.eval", "--checkpoint", str(trained_run / CKPT), "--tokenizer", str(eval_tokenizer),
         "--tasks", ",".join(["megamobi_tiny_mc", "megamobi_missing_dataset", *(t.task for t in PAPER_SUITE)]),
         "--include-path", str(TASK_DIR), "--device", "cpu",
         "--batch-size", "8", "--output", str(output), "--log-samples"],
        cwd=repo_root, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    # One task could not run: exit 1, after the other task ran and the results were written.
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    missing = [line for line in proc.stderr.splitlines() if "megamobi_missing_dataset" in line and "dataset" in line
               and "offline" in line]
    assert len(missing) == 1
    assert "megamobi-tests/never-downloaded" in missing[0]
    assert "python -m megamobi.eval --download --tasks megamobi_missing_dataset" in missing[0]

    scores, labels = own_loglikelihoods
    expected_acc = sum(max(range(len(row)), key=row.__getitem__) == label for row, label in zip(scores, labels)) / len(labels)
    record = json.loads(output.read_text())
    task = record["tasks"]["megamobi_tiny_mc"]
    assert task["status"] == "ok"
    assert task["metrics"]["acc"] == pytest.approx(expected_acc, abs=1e-12)
    assert task["n_samples"]["megamobi_tiny_mc"]["effective"] == len(labels) == 36
    logged = [json.loads(line) for line in Path(f"{output}.samples.jsonl").read_text().splitlines()]
    logged = sorted((s for s in logged if s["task"] == "megamobi_tiny_mc"), key=lambda s: s["doc_id"])
    assert [[float(resp[0]) for resp in s["resps"]] for s in logged] == [pytest.approx(row, abs=1e-4) for row in scores]
    # The promised fields: every metric with its stderr, versions, shots, provenance.
    assert set(task["metrics"]) == {"acc", "acc_norm"} and set(task["stderr"]) == {"acc", "acc_norm"}
    assert all(isinstance(v, float) and v > 0 for v in task["stderr"].values())
    assert task["versions"] == {"megamobi_tiny_mc": 1.0}
    assert task["n_shot"] == {"megamobi_tiny_mc": 0} and task["num_fewshot"] == 0
    assert record["software"]["lm_eval"] == lm_eval.__version__
    manifest = json.loads((trained_run / CKPT / "megamobi.json").read_text())
    model = record["model"]
    assert (model["step"], model["consumed_tokens"]) == (6, 6 * 8 * 32)
    assert model["code_version"] == manifest["code_version"] and model["kind"] == "megamobi"
    assert record["missing_datasets"][0] == {"task": "megamobi_missing_dataset",
                                             "dataset": "megamobi-tests/never-downloaded",
                                             "message": missing[0].split(": ", 1)[1]}
    # The printed table: the evaluated row, the paper's two rows, the average over what ran.
    # The paper's nine tasks, whose datasets this offline machine lacks: one line each naming the dataset,
    # and their shots as the paper's Table 4 setting says.
    for entry in PAPER_SUITE:
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"python -m megamobi.eval: task {entry.task}: ")]
        assert f"--download --tasks {entry.task}`" in line
        assert record["tasks"][entry.task]["status"] == "missing_dataset"
        assert record["settings"]["num_fewshot"][entry.task] == entry.num_fewshot
    assert {t: record["settings"]["num_fewshot"][t] for t in ("hellaswag", "arc_challenge", "winogrande", "mmlu")} == {
        "hellaswag": 10, "arc_challenge": 25, "winogrande": 5, "mmlu": 5}
    assert record["tasks"]["piqa"]["dataset"] == "baber/piqa" and record["tasks"]["mmlu"]["dataset"] == "cais/mmlu"
    header = [c.strip() for c in proc.stdout.splitlines()[0].strip("|").split("|")]
    assert header == ["Model Name", "#Params", "megamobi_tiny_mc", "megamobi_missing_dataset", "HellaSwag", "Truthfulqa",
                      "MMLU", "Arc_C", "CrowsPairs", "piqa", "race", "siqa", "winogrande", "Average"]
    paper_05 = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| MobiLlama 0.5B (paper)"))
    assert [c.strip() for c in paper_05.strip("|").split("|")][4:13] == [
        "52.52", "38.05", "26.45", "29.52", "64.03", "72.03", "33.68", "40.22", "57.53"]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| test-tiny step 6"))
    assert row.split("|")[-2].strip() == f"{100 * expected_acc:.2f}"
    # The export is cached next to the checkpoint and reused.
    assert (trained_run / "checkpoints" / ".hf-eval" / "step_0000006" / "config.json").is_file()


def test_stock_lm_eval_cli_gives_the_same_loglikelihoods(tmp_path, trained_run, eval_tokenizer, own_loglikelihoods,
                                                           repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)  # the shipped task's data_files path is relative to it
    hf_dir = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "megamobi.convert", "to-hf", "--checkpoint", str(trained_run / CKPT),
                    "--output", str(hf_dir), "--dtype", "fp32", "--tokenizer", str(eval_tokenizer)],
                   cwd=repo_root, check=True, capture_output=True, timeout=300)
    lm_eval_cli = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [str(lm_eval_cli), "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
         "--tasks", "megamobi_tiny_mc", "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        cwd=repo_root, env=offline_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("samples_megamobi_tiny_mc_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    scores, _ = own_loglikelihoods
    assert len(samples) == len(scores) == 36
    for sample, row in zip(samples, scores):
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert theirs == pytest.approx(row, abs=1e-4)
    # megamobi.eval takes the exported directory as it is, too.
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    assert eval_main(["--checkpoint", str(hf_dir), "--tasks", "megamobi_tiny_mc", "--include-path", str(TASK_DIR),
                      "--device", "cpu", "--output", str(tmp_path / "hf.json")]) == 0
    record = json.loads((tmp_path / "hf.json").read_text())
    assert record["model"]["kind"] == "hf" and record["model"]["path"] == str(hf_dir)
    expected_acc = sum(max(range(len(row)), key=row.__getitem__) == sample["doc"]["label"]
                       for row, sample in zip(scores, samples)) / len(scores)
    assert record["tasks"]["megamobi_tiny_mc"]["metrics"]["acc"] == pytest.approx(expected_acc, abs=1e-12)


def copy_run(trained_run: Path, where: Path) -> Path:
    """A run of one's own to damage or to evaluate twice (the shared fixture stays as it is)."""
    shutil.copytree(trained_run, where, ignore=shutil.ignore_patterns(".hf-eval", "eval*", "plots"))
    return where


def damage(checkpoint: Path) -> None:
    """Flip bytes in the middle of one weights file: the checkpoint fails its manifest's checksums."""
    weights = next((checkpoint / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2:len(data) // 2 + 16] = bytes(16)
    weights.write_bytes(bytes(data))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_keys_results_by_settings_and_goes_past_a_broken_checkpoint(tmp_path, trained_run, eval_tokenizer,
                                                                           repo_root, monkeypatch, capsys):
    """Issue 20 cases 1, 2 and 10 (and issue 17's sweep case) through the real command line: a broken
    checkpoint is one warning line and skipped, every re-run still evaluates the ones after it; a
    result is reused only for the same checkpoint, task, shots, limit and lm-eval version."""
    import lm_eval

    monkeypatch.chdir(repo_root)  # the shipped task's data_files path is relative to it
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    run = copy_run(trained_run, tmp_path / "run")
    damage(run / "checkpoints" / "step_0000004")
    # The Trainer records where it was launched: relative data paths resolve from it (issue 20 case 7).
    assert json.loads((run / CKPT / "megamobi.json").read_text())["launch_dir"] == os.getcwd()
    other_tasks = tmp_path / "more-tasks"  # a second --include-path folder with its own task
    other_tasks.mkdir()
    (other_tasks / "megamobi_tiny_mc_b.yaml").write_text(
        (TASK_DIR / "megamobi_tiny_mc.yaml").read_text().replace("task: megamobi_tiny_mc", "task: megamobi_tiny_mc_b"))
    resolve_model(run / CKPT, tokenizer=eval_tokenizer, progress=False)  # an export made before the sweep: kept
    csv_path = run / "eval.csv"
    base = ["--checkpoints", str(run), "--tokenizer", str(eval_tokenizer), "--include-path", str(TASK_DIR),
            "--device", "cpu"]

    def sweep(*extra: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        status = eval_main([*base, *extra])
        return status, capsys.readouterr().err.splitlines()

    status, err = sweep("--tasks", "megamobi_tiny_mc", "--limit", "6")
    assert status == 1  # a checkpoint was skipped; the others' results are written
    (warning,) = [line for line in err if "warning:" in line]
    assert warning.startswith("[megamobi.eval] warning: step_0000004: skipped: ")
    assert "broken or incomplete checkpoint, refusing to evaluate it" in warning
    assert f"run `python -m megamobi.checkpoints {run.resolve()} --verify`" in warning  # the advice (issue 17 case 11)
    assert warning.endswith("the sweep goes on (re-run to retry)")
    assert "Traceback" not in "\n".join(err)
    rows = read_csv(csv_path)
    version = lm_eval.__version__
    assert [(r["step"], r["tokens"], r["checkpoint"], r["task"], r["num_fewshot"], r["limit"], r["lm_eval"])
            for r in rows] == [("2", "512", "step_0000002", "megamobi_tiny_mc", "0", "6", version),
                               ("6", "1536", "step_0000006", "megamobi_tiny_mc", "0", "6", version)]
    assert all(0.0 <= float(r["acc"]) <= 1.0 and float(r["acc_stderr"]) >= 0 for r in rows)
    assert {r["run_dir"] for r in rows} == {str(run.resolve())} and {r["task_version"] for r in rows} == {"1.0"}
    assert len(list((run / "eval").glob("step_0000002.*.json"))) == 1
    # The sweep's own exports are deleted (and it says so); one that existed before is kept.
    exported = [line for line in err if "exported" in line]
    assert exported and all("deleted after this checkpoint" in line and "reused" not in line for line in exported)
    assert not (run / "checkpoints" / ".hf-eval" / "step_0000002").exists()
    assert (run / "checkpoints" / ".hf-eval" / "step_0000006" / "config.json").is_file()

    before = csv_path.read_text()
    status, err = sweep("--tasks", "megamobi_tiny_mc", "--limit", "6")  # the same again: only the broken one is left
    assert status == 1 and csv_path.read_text() == before
    assert any("2 (checkpoint, task) results with these settings already in" in line and
               "1 checkpoints to evaluate" in line for line in err)
    assert sum("warning: step_0000004: skipped" in line for line in err) == 1

    # A new task from a second --include-path: only it is evaluated; the first task's rows stay as they were.
    status, _ = sweep("--include-path", str(other_tasks), "--tasks", "megamobi_tiny_mc,megamobi_tiny_mc_b",
                      "--limit", "6")
    assert status == 1
    rows = read_csv(csv_path)
    assert [(r["step"], r["task"]) for r in rows] == [("2", "megamobi_tiny_mc"), ("2", "megamobi_tiny_mc_b"),
                                                      ("6", "megamobi_tiny_mc"), ("6", "megamobi_tiny_mc_b")]
    first = {(r["step"], r["task"]): r["acc"] for r in read_csv_text(before)}
    assert all(r["acc"] == first[(r["step"], r["task"])] for r in rows if r["task"] == "megamobi_tiny_mc")
    newest = max((run / "eval").glob("step_0000006.*.json"), key=lambda p: p.stat().st_mtime_ns)
    assert set(json.loads(newest.read_text())["tasks"]) == {"megamobi_tiny_mc_b"}
    # Other shots and limit: rows of their own, never mixed into the old ones (each key field alone:
    # test_a_result_is_keyed_by_checkpoint_task_shots_limit_and_harness_version).
    status, _ = sweep("--tasks", "megamobi_tiny_mc", "--limit", "3", "--num-fewshot", "1")
    rows = read_csv(csv_path)
    keys = sorted((r["step"], r["task"], r["num_fewshot"], r["limit"]) for r in rows)
    assert keys == sorted([(s, "megamobi_tiny_mc", "0", "6") for s in ("2", "6")] +
                          [(s, "megamobi_tiny_mc_b", "0", "6") for s in ("2", "6")] +
                          [(s, "megamobi_tiny_mc", "1", "3") for s in ("2", "6")])
    assert len(list((run / "eval").glob("step_0000002.*.json"))) == 3  # one record per sweep, none replaced
    # The plot of that CSV: a benchmarks.png whose series keep the settings apart.
    assert plot_main([str(run), "--eval", str(csv_path), "--output", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "benchmarks.png").stat().st_size > 0


def read_csv_text(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_a_sweep_refuses_a_csv_of_another_run_or_of_the_old_layout(tmp_path, trained_run, eval_tokenizer, capsys):
    other = tmp_path / "other.csv"
    other.write_text("step,tokens,checkpoint,task,num_fewshot,limit,lm_eval,task_version,run_dir,acc\n"
                     f"2,512,step_0000002,t,0,,0.4.13,1.0,{tmp_path},0.5\n")
    old = tmp_path / "old.csv"
    old.write_text("step,tokens,checkpoint,megamobi_tiny_mc/acc\n2,512,step_0000002,0.5\n")
    for csv_file, expected in ((other, f"holds the results of another run ({tmp_path})"),
                               (old, "written by an older megamobi.eval")):
        before = csv_file.read_text()
        status = eval_main(["--checkpoints", str(trained_run), "--tokenizer", str(eval_tokenizer), "--tasks",
                            "megamobi_tiny_mc", "--include-path", str(TASK_DIR), "--output", str(csv_file)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and expected in err[-1] and csv_file.read_text() == before, err


def test_results_files_never_collide_across_runs(tmp_path, trained_run, eval_tokenizer, monkeypatch, capsys):
    """Issue 20 case 3: the default results name carries the run; an existing file of another
    checkpoint is replaced only with --overwrite, and that is checked before any evaluation."""
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    first = trained_run / CKPT  # a run called `run`
    second = copy_run(trained_run, tmp_path / "r2") / CKPT
    twin = copy_run(trained_run, tmp_path / "elsewhere" / "run") / CKPT  # another run called `run`
    out = tmp_path / "out"
    out.mkdir()
    (out / "tests").symlink_to(TASK_DIR.parent.parent)  # the task's data file is relative to the working directory
    monkeypatch.chdir(out)

    def evaluate(checkpoint: Path, *extra: str) -> int:
        return eval_main(["--checkpoint", str(checkpoint), "--tokenizer", str(eval_tokenizer), "--tasks",
                          "megamobi_tiny_mc", "--include-path", str(TASK_DIR), "--device", "cpu", "--limit", "2", *extra])

    assert evaluate(first) == 0 and evaluate(second) == 0 and evaluate(twin) == 0
    owners = {p.name: json.loads(p.read_text())["model"]["path"] for p in out.glob("*.json")}
    assert owners["eval-run-step_0000006.json"] == str(first.resolve())
    assert owners["eval-r2-step_0000006.json"] == str(second.resolve())
    (twin_name,) = [n for n in owners if n.startswith("eval-run-step_0000006-")]
    assert owners[twin_name] == str(twin.resolve()) and len(owners) == 3
    capsys.readouterr()
    target = out / "eval-r2-step_0000006.json"
    before = target.read_text()
    assert evaluate(first, "--output", str(target)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the results of another checkpoint" in err[0] and "--overwrite" in err[0], err
    assert target.read_text() == before
    assert evaluate(first, "--output", str(target), "--overwrite") == 0
    assert json.loads(target.read_text())["model"]["path"] == str(first.resolve())


def test_every_k_picks_the_same_checkpoints_when_resumed():
    checkpoints = [(s, Path(f"step_{s:07d}")) for s in (100, 200, 300, 400, 500, 700)]
    steps = lambda paths: [int(p.name[5:]) for p in paths]  # noqa: E731
    assert steps(select_checkpoints(checkpoints, evaluated_steps=set(), every=None)) == [100, 200, 300, 400, 500, 700]
    assert steps(select_checkpoints(checkpoints, evaluated_steps=set(), every=250)) == [100, 400, 700]
    # Interrupted after 100 and 400: the resumed sweep picks what the uninterrupted one would have.
    assert steps(select_checkpoints(checkpoints, evaluated_steps={100, 400}, every=250)) == [100, 400, 700]
    assert steps(select_checkpoints(checkpoints, evaluated_steps={100}, every=250)) == [100, 400, 700]


def test_a_result_is_keyed_by_checkpoint_task_shots_limit_and_harness_version():
    key = dict(checkpoint="step_0000002", task="hellaswag", shots=10, limit=None, lm_eval="0.4.13")
    same_row = {"checkpoint": "step_0000002", "task": "hellaswag", "num_fewshot": "10", "limit": "", "lm_eval": "0.4.13"}
    assert result_key(**key) == row_key(same_row)
    for change in ({"checkpoint": "step_0000004"}, {"task": "piqa"}, {"shots": 0}, {"limit": 100},
                   {"lm_eval": "0.4.14"}):
        assert result_key(**{**key, **change}) != row_key(same_row), change


def test_download_mode_reports_each_task(tmp_path, repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)  # the shipped task's data_files path is relative to it
    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    status = eval_main(["--download", "--tasks", "megamobi_tiny_mc,megamobi_missing_dataset,megamobi_bad_data_file",
                        "--include-path", str(TASK_DIR)])
    out = capsys.readouterr().out.splitlines()
    assert status == 1
    assert out[0] == "megamobi_tiny_mc: ok, in the datasets cache"
    assert out[1].startswith("megamobi_missing_dataset: task megamobi_missing_dataset: dataset megamobi-tests/never-downloaded")
    assert out[2].startswith("megamobi_bad_data_file: task megamobi_bad_data_file: data file ")
    assert out[2].endswith("tests/eval/tasks/no_such_file.jsonl not found; fix data_files in the task's YAML "
                           "(a relative path is relative to the working directory)")


@pytest.mark.parametrize("argv, expected", [
    (["--checkpoint", "CKPT", "--limit", "0"], "--limit: 0 must be a positive whole number"),
    (["--checkpoint", "CKPT", "--limit", "-3"], "--limit: -3 must be a positive whole number"),
    (["--checkpoint", "CKPT", "--limit", "ten"], "--limit: 'ten' is not a whole number"),
    (["--checkpoint", "CKPT", "--batch-size", "0"], "--batch-size: 0 must be a positive whole number"),
    (["--checkpoint", "CKPT", "--batch-size", "-1"], "--batch-size: -1 must be a positive whole number"),
    (["--checkpoints", "RUN", "--every", "0"], "--every: 0 must be a positive whole number"),
    (["--checkpoints", "RUN", "--every", "-2"], "--every: -2 must be a positive whole number"),
    (["--checkpoint", "CKPT", "--every", "2"], "--every only applies with --checkpoints"),
    (["--checkpoint", "CKPT", "--device", "tpu"], "--device tpu: unknown device"),
    (["--checkpoint", "CKPT", "--device", "cuda:0"], "--device cuda:0: no CUDA device"),
    (["--checkpoint", "CKPT", "--device", "cuda"], "--device cuda: no CUDA device on this machine"),
    (["--checkpoints", "RUN", "--overwrite"], "--overwrite only applies with --checkpoint"),
    (["--checkpoint", "CKPT", "--include-path", "TASKS", "--include-path", "MISSING"],
     "--include-path MISSING: no such directory"),
    (["--checkpoint", "CKPT", "--include-path", "TASKS", "--include-path", "FILE"], "--include-path FILE: is a file"),
    (["--checkpoint", "CKPT", "--tokenizer", "FILE", "--output", "FILE"],
     "--output FILE: exists and is not a megamobi.eval results file"),
    (["--checkpoint", "CKPT", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["--checkpoint", "CKPT", "--suite", "leaderboard"], "argument --suite: invalid choice"),
    (["--checkpoint", "MISSING"], "--checkpoint MISSING: no such directory"),
    (["--checkpoint", "FILE"], "--checkpoint FILE: is a file"),
    (["--checkpoints", "FILE"], "--checkpoints FILE: is a file"),
    (["--checkpoints", "CKPT"], "not a run directory"),
    (["--checkpoint", "CKPT", "--include-path", "FILE"], "--include-path FILE: is a file"),
    (["--checkpoint", "CKPT", "--include-path", "MISSING"], "--include-path MISSING: no such directory"),
    (["--checkpoint", "CKPT", "--tokenizer", "MISSING"], "--tokenizer MISSING: no such file"),
    (["--checkpoint", "CKPT", "--output", "RUN"], "is a directory; pass a file name"),
    (["--download", "--tasks", "hellaswag,no_such_task_xyz"], "unknown lm-eval task no_such_task_xyz"),
    (["--checkpoint", "RUN", "--tasks", "megamobi_tiny_mc", "--include-path", "TASKS"], "neither a megamobi checkpoint"),
    (["--checkpoint", "CKPT", "--tasks", "megamobi_tiny_mc", "--include-path", "TASKS"], "pass --tokenizer"),
    (["--limit", "5"], "pass --checkpoint DIR, --checkpoints RUN_DIR or --download"),
])
def test_bad_command_lines_exit_2_with_one_line(argv, expected, tmp_path, trained_run, capsys, monkeypatch):
    import torch

    if "cuda" in " ".join(argv) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("not a directory\n")
    places = {"CKPT": str(trained_run / CKPT), "RUN": str(trained_run), "TASKS": str(TASK_DIR)}
    argv = [places.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(eval_main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("python -m megamobi.eval: error: ") and expected in err[0], err[0]


def test_a_bad_value_through_the_real_command_is_one_line(repo_root):
    proc = subprocess.run([sys.executable, "-m", "megamobi.eval", "--checkpoint", ".", "--batch-size", "0"],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("python -m megamobi.eval: error: argument --batch-size: 0 must be a positive "
                                   "whole number (see --help)")


def test_the_tokenizer_is_found_from_the_training_data(tmp_path, eval_tokenizer):
    from megamobi.checkpointing.recorded_paths import training_tokenizer as find_training_tokenizer
    from megamobi.files import sha256_file

    shards = tmp_path / "shards"
    shards.mkdir()
    manifest = {"run_config": {"data": {"paths": [str(tmp_path / "gone"), str(shards)]}}}
    (shards / "manifest.json").write_text(json.dumps({"tokenizer": {"path": str(eval_tokenizer),
                                                                    "sha256": sha256_file(eval_tokenizer)}}))
    assert find_training_tokenizer(manifest) == eval_tokenizer
    # A tokenizer file that changed since the data was made is not the data's tokenizer.
    (shards / "manifest.json").write_text(json.dumps({"tokenizer": {"path": str(eval_tokenizer), "sha256": "0" * 64}}))
    assert find_training_tokenizer(manifest) is None
    (shards / "manifest.json").write_text(json.dumps({"tokenizer": {"path": None, "sha256": None}}))  # Amber data
    assert find_training_tokenizer(manifest) is None


def test_the_export_is_reused_until_the_checkpoint_or_tokenizer_changes(tmp_path, trained_run, eval_tokenizer):
    checkpoint, cache = trained_run / "checkpoints" / "step_0000004", tmp_path / "cache"
    first = resolve_model(checkpoint, tokenizer=eval_tokenizer, cache_dir=cache, progress=False)
    assert first.exported and (cache / "config.json").is_file() and first.provenance["step"] == 4
    assert not resolve_model(checkpoint, tokenizer=eval_tokenizer, cache_dir=cache, progress=False).exported
    other = tmp_path / "other.model"
    other.write_bytes(eval_tokenizer.read_bytes())  # same bytes, same sha256: still the same export
    assert not resolve_model(checkpoint, tokenizer=other, cache_dir=cache, progress=False).exported
    (cache / "megamobi-eval-source.json").write_text("{}")  # a stamp that no longer matches
    assert resolve_model(checkpoint, tokenizer=eval_tokenizer, cache_dir=cache, progress=False).exported
    assert not list(tmp_path.glob("*.tmp"))
