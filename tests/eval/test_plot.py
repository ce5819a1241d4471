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
EVAL_HEADER = "step,tokens,checkpoint,task,num_fewshot,limit,lm_eval,task_version,run_dir,"


def eval_csv(*rows: str, metrics: str = "acc,acc_stderr,acc_norm") -> str:
    """eval.csv as `python -m megamobi.eval --checkpoints` writes it; each row: step,tokens,task,shots,limit,values."""
    lines = [EVAL_HEADER + metrics]
    for row in rows:
        step, tokens, task, shots, limit, values = row.split(",", 5)
        lines.append(f"{step},{tokens},step_{int(step):07d},{task},{shots},{limit},0.4.13,1.0,/runs/x,{values}")
    return "\n".join(lines) + "\n"


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
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text(eval_csv("2,512,megamobi_tiny_mc,0,,0.25,0.01,0.5", "4,1024,megamobi_tiny_mc,0,,0.30,0.01,0.45",
                                 "6,1536,megamobi_tiny_mc,0,,0.35,0.01,"))
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "megamobi.plot", str(trained_run), str(second), "--eval", str(csv_path),
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
    (run / "eval.csv").write_text(eval_csv(
        "2,512,hellaswag,10,,0.25,0.26,,", "2,512,mmlu,5,,0.24,,,", "2,512,piqa,0,,0.50,0.51,,", "2,512,my_task,0,,,,0.1,0.0",
        "6,1536,hellaswag,10,,0.27,0.28,,", "6,1536,mmlu,5,,0.25,,,", "6,1536,piqa,0,,0.52,0.53,,",
        "6,1536,my_task,0,,,,0.2,0.1", metrics="acc,acc_norm,f1,em"))
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
    # Issue 20 case 9: a bad eval.csv is one line naming file, line and column, and no PNG is written.
    ("csv:" + eval_csv("2,512,t,0,,0.25,0.01,high"), ["RUN", "--eval", "BAD.csv"],
     "--eval BAD.csv:2: column acc_norm: 'high' is not a number"),
    ("csv:" + eval_csv("2,many,t,0,,0.25,0.01,0.5"), ["RUN", "--eval", "BAD.csv"], "--eval BAD.csv:2: column tokens"),
    ("csv:" + eval_csv("2,512,t,0,,inf,", metrics="acc,acc_stderr"), ["RUN", "--eval", "BAD.csv"],
     "column acc: inf is not a finite number"),
    ("csv:" + EVAL_HEADER.rstrip(",") + "\n2,512,s,t,0,,0.4.13,1.0,/r\n", ["RUN", "--eval", "BAD.csv"],
     "--eval BAD.csv: no metric column"),
    ("csv:" + eval_csv("2,512,t,0,,,,", metrics="acc,acc_stderr,acc_norm"), ["RUN", "--eval", "BAD.csv"],
     "no metric values in any row"),
    ("csv:" + eval_csv("2,512,t,0,,0.25,0.01,0.5,0.7"), ["RUN", "--eval", "BAD.csv"], "BAD.csv:2: more cells than"),
    ("csv:step,tokens,checkpoint,t/acc\n2,512,step_0000002,0.5\n", ["RUN", "--eval", "BAD.csv"],
     "written by an older megamobi.eval"),
    ("csv:a,b\n1,2\n", ["RUN", "--eval", "BAD.csv"], "no tokens and task columns"),
    ("csv:binary", ["RUN", "--eval", "BAD.csv"], "--eval BAD.csv: not a CSV file"),
])
def test_bad_plot_arguments_exit_2_with_one_line(setup, argv, expected, tmp_path, trained_run, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("FILE").write_text("x\n")
    Path("EMPTY").mkdir()
    if setup == "garbage":
        Path("EMPTY/metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    if setup == "run" or (setup or "").startswith("csv:"):
        Path("RUN").mkdir()
        shutil.copy(trained_run / "metrics.jsonl", "RUN/metrics.jsonl")
    if (setup or "").startswith("csv:"):
        Path("BAD.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" if setup == "csv:binary" else setup[4:].encode())
        Path("RUN/plots").mkdir()
        Path("RUN/plots/benchmarks.png").write_bytes(b"the good picture")
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(plot_main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m megamobi.plot: error: ") and expected in err[0], err
    if (setup or "").startswith("csv:"):  # nothing written over the earlier pictures
        assert [p.name for p in Path("RUN/plots").iterdir()] == ["benchmarks.png"]
        assert Path("RUN/plots/benchmarks.png").read_bytes() == b"the good picture"


def test_throughput_has_no_empty_mfu_panel(tmp_path, trained_run):
    """Issue 20 case 11: a CPU run logs no MFU: throughput.png is the tokens/s panel alone, and says once
    why there is no MFU; a run that logged MFU gets its panel."""
    import json

    from PIL import Image

    cpu = tmp_path / "cpu"
    cpu.mkdir()
    shutil.copy(trained_run / "metrics.jsonl", cpu / "metrics.jsonl")
    assert not any("mfu" in json.loads(line) and json.loads(line)["mfu"] is not None
                   for line in (cpu / "metrics.jsonl").read_text().splitlines())
    gpu = tmp_path / "gpu"
    gpu.mkdir()
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    (gpu / "metrics.jsonl").write_text("".join(json.dumps({**r, "mfu": 0.4} if "tokens_per_s" in r else r) + "\n"
                                               for r in lines))

    def panels(run: Path) -> int:
        """Axes in throughput.png: each has a top and a bottom frame line, dark across most of the width."""
        assert plot_main([str(run), "--output", str(run / "plots")]) == 0
        with Image.open(run / "plots" / "throughput.png") as image:
            gray = image.convert("L")
            xs = range(image.width // 5, 4 * image.width // 5)
            frame_rows = [y for y in range(image.height) if sum(gray.getpixel((x, y)) < 100 for x in xs) > 0.9 * len(xs)]
        lines = sum(1 for i, y in enumerate(frame_rows) if i == 0 or y != frame_rows[i - 1] + 1)
        return lines // 2

    assert panels(cpu) == 1
    assert panels(gpu) == 2
