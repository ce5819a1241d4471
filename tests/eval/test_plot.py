"""`python -m megamobi.plot` on a real tiny run: one valid PNG of the promised size per figure."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from megamobi.plot import DPI, FIG_SIZE_IN
from megamobi.plot import main as plot_main

FIGURES = ["loss.png", "lr.png", "grad_norm.png", "throughput.png"]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_real_picture(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    assert png_size(path) == size
    with Image.open(path) as image:
        image.load()  # decodes every chunk: a truncated file fails here
        low, high = image.convert("L").getextrema()
    assert high - low > 100, f"{path} is blank"


def test_plots_of_two_runs_and_their_benchmarks(tmp_path, trained_run, repo_root):
    second = tmp_path / "second-run"
    second.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", second / "metrics.jsonl")
    eval_csv = tmp_path / "eval.csv"
    eval_csv.write_text("step,tokens,checkpoint,megamobi_tiny_mc/acc,megamobi_tiny_mc/acc_norm\n"
                        "2,512,step_0000002,0.25,0.5\n4,1024,step_0000004,0.30,0.45\n6,1536,step_0000006,0.35,\n")
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "megamobi.plot", str(trained_run), str(second), "--eval", str(eval_csv),
                           "--output", str(out)], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    written = [Path(line) for line in proc.stdout.split()]
    assert sorted(p.name for p in written) == sorted([*FIGURES, "benchmarks.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)  # one file per figure, nothing else
    size = (int(FIG_SIZE_IN[0] * DPI), int(FIG_SIZE_IN[1] * DPI))
    for path in written:
        assert_real_picture(path, size)


def test_default_output_is_the_run_dir(tmp_path, trained_run):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", run / "metrics.jsonl")
    assert plot_main([str(run)]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(FIGURES)


def test_paper_tasks_get_their_headline_metric_panels(tmp_path, trained_run):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", run / "metrics.jsonl")
    (run / "eval.csv").write_text(
        "step,tokens,checkpoint,hellaswag/acc,hellaswag/acc_norm,mmlu/acc,piqa/acc,piqa/acc_norm,my_task/f1,my_task/em\n"
        "2,512,step_0000002,0.25,0.26,0.24,0.50,0.51,0.1,0.0\n6,1536,step_0000006,0.27,0.28,0.25,0.52,0.53,0.2,0.1\n")
    assert plot_main([str(run), "--eval", str(run / "eval.csv"), "--output", str(tmp_path / "p")]) == 0
    # hellaswag/acc_norm, mmlu/acc, piqa/acc_norm (the Table 4 metrics) and both metrics of my_task: 5 panels,
    # three per row.
    assert_real_picture(tmp_path / "p" / "benchmarks.png", (1200, 700))


@pytest.mark.parametrize("setup, argv, expected", [
    (None, ["MISSING"], "MISSING: no such run directory"),
    ("file", ["FILE"], "FILE: is a file; pass a run directory"),
    ("empty", ["EMPTY"], "metrics.jsonl: not found"),
    ("garbage", ["EMPTY"], "metrics.jsonl:2: not a JSON line"),
    ("run", ["RUN", "--eval", "MISSING.csv"], "--eval MISSING.csv: no such file"),
    ("run", ["RUN", "--eval", "EMPTY"], "--eval EMPTY: is a directory"),
    ("run", ["RUN", "--output", "FILE"], "--output FILE: is a file"),
    ("run", ["RUN", "--eval", "FILE", "FILE"], "--eval: 2 files for 1 runs"),
])
def test_bad_plot_arguments_exit_2_with_one_line(setup, argv, expected, tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("FILE").write_text("x\n")
    Path("EMPTY").mkdir()
    if setup == "garbage":
        Path("EMPTY/metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    if setup == "run":
        Path("RUN").mkdir()
        shutil.copy(trained_run / "metrics.jsonl", "RUN/metrics.jsonl")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(plot_main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m megamobi.plot: error: ") and expected in err[0], err
