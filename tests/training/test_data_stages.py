"""Data stages and warmup-stable-decay, decided mid-run, through the real CLI on 2 ranks.

One run, `bash launch/pretrain.sh` with 2 processes: stage 1 'web' (one directory, 2 samples = 2 steps an
epoch, so its second epoch begins inside it) until 5,000 tokens (rounded up to step 3), then stage 2 'mix'
(another directory blended 3:1) to the end, a wsd schedule decaying over the last 2 steps of 10. It is
killed with -9 around the step before the boundary and around the step after it; then resumed with stage
2 given an end, stage 3 'tail' appended, the run lengthened to 12 steps and the decay moved to the last 3
(the decay had not begun: accepted and recorded). The result equals, bitwise, a run configured that way
from the start; so do resumes from exactly the checkpoints before, at and after the boundary. Replay
shows the stage of every step, stage 1 drawing only from its directory with no window twice in an epoch,
stage 2 in its 3:1 proportions over its epoch; the lr is the formula at every step; a started stage
changed, or a schedule changed once the decay began, is refused with old and new values unless allowed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import descendants, make_run, read_metrics

from megamobi.checkpointing.manifest import read_manifest
from megamobi.checkpointing.model_files import read_full_tensors
from megamobi.data.preprocess import PreprocessOptions, preprocess
from megamobi.data.replay import RunReplay
from megamobi.pretrain import main as pretrain_main
from megamobi.training.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
GB, SEQ = 32, 64
TPS = GB * SEQ  # 2,048 tokens a step; a 2049-token sample is 32 windows = one step
LR, MIN_LR, WARMUP = 1e-2, 1e-3, 2


@pytest.fixture(scope="module")
def stage_shards(tmp_path_factory):
    """web: 2 samples of source web; hq: 4 samples, math and code alternating."""
    root = tmp_path_factory.mktemp("stage-shards")
    rng = np.random.default_rng(5)
    out = {}
    for name, sources in (("web", ["web", "web"]), ("hq", ["math", "code", "math", "code"])):
        with open(root / f"{name}.jsonl", "w") as f:
            for source in sources:
                f.write(json.dumps({"token_ids": rng.integers(0, 512, 2049).tolist(), "source": source}) + "\n")
        preprocess(PreprocessOptions(inputs=[str(root / f"{name}.jsonl")], output=str(root / name), vocab_size=512,
                                     progress=False))
        out[name] = str(root / name)
    return out


def _run(run_dir, shards, *, steps, decay_tokens, stage_b_until=None, stage_c=False, **extra):
    stages = [{"name": "web", "paths": [shards["web"]], "until_tokens": 5000},
              {"name": "mix", "paths": [shards["hq"]], "source_weights": {"math": 3.0, "code": 1.0}}]
    if stage_c:
        stages[1]["until_tokens"] = stage_b_until
        stages.append({"name": "tail", "paths": [shards["web"], shards["hq"]]})
    sections = dict(
        data={"paths": [], "seed": 7, "stages": stages},
        batch={"micro_batch_size": 8, "global_batch_size": GB, "seq_len": SEQ},
        optimizer={"lr": LR, "min_lr": MIN_LR, "warmup_steps": WARMUP, "clip_grad": 1.0, "decay_style": "wsd",
                   "decay_tokens": decay_tokens},
        train={"steps": steps, "seed": 11, "log_interval": 1},
        checkpoint={"interval_tokens": TPS})  # every step: any step is a resume point
    for key, value in extra.items():
        sections[key] = {**sections.get(key, {}), **value}
    return make_run(run_dir, shards["web"], **sections)


def _planned(run_dir, shards):
    """What the run is first launched with: stages web | mix, 10 steps, the decay over the last 2."""
    return _run(run_dir, shards, steps=10, decay_tokens=2 * TPS)


def _decided(run_dir, shards):
    """What it is resumed with: mix ends at step 7, tail appended, 12 steps, the decay over the last 3."""
    return _run(run_dir, shards, steps=12, decay_tokens=3 * TPS, stage_b_until=7 * TPS, stage_c=True)


def _lr_formula(s: int) -> float:
    """wsd as docs/training.md states it, for the decided run: 0-based step s of 12, decay from step index 9."""
    if s < WARMUP:
        return LR * s / WARMUP
    if s < 9:
        return LR
    return MIN_LR + (LR - MIN_LR) * (1 - (s - 9) / 3)


def _train(rank, run):
    Trainer(run).train()


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "PYTHON": sys.executable, "PATH": f"{bin_dir}:{env.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "NPROC_PER_NODE": "2", "MASTER_PORT": str(free_port())}


def _launch(config: Path, log: Path, *, kill_after_step: int | None = None) -> int:
    """`bash launch/pretrain.sh RUN.yaml` on 2 ranks; with kill_after_step, SIGKILL every process of it
    once that step is logged. The exit status (-9 when killed)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), str(config)], cwd=REPO, env=_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if kill_after_step is None:
            return proc.wait(timeout=600)
        metrics, deadline = Path(config.parent / "run" / "metrics.jsonl"), time.monotonic() + 600
        while _logged_step(metrics) < kill_after_step:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to kill it at"
            time.sleep(0.002)
        for pid in [proc.pid, *descendants(proc.pid)]:  # the ranks run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        return proc.wait(timeout=60)


def _logged_step(metrics: Path) -> int:
    try:
        return max((json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if '"loss"' in line),
                   default=0)
    except (FileNotFoundError, ValueError):  # a line being written
        return 0


def _resumed_step(log: Path) -> int:
    [line] = [line for line in log.read_text().splitlines() if "resumed from" in line]
    return int(line.split(" at step ")[1].split()[0])


def _cli(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _check_only(config: Path, *overrides: str, capsys) -> tuple[int, str, str]:
    os.environ["WORLD_SIZE"] = "2"
    try:
        code = pretrain_main(["--check-only", "--config", str(config), *overrides])
    finally:
        del os.environ["WORLD_SIZE"]
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _final_tensors(run_dir: Path, step: int = 12):
    return {kind: read_full_tensors(run_dir / "checkpoints" / f"step_{step:07d}", kind) for kind in ("model", "optimizer")}


def _assert_bitwise(got: dict, expected: dict, what: str) -> None:
    for kind in expected:
        assert expected[kind].keys() == got[kind].keys()
        for key in expected[kind]:
            assert torch.equal(expected[kind][key], got[kind][key]), f"{what}: {kind} {key}"


def test_stages_and_wsd_decided_mid_run_through_the_cli(tmp_path, stage_shards, capsys):
    run_dir = tmp_path / "run"
    planned = write_run_yaml(tmp_path / "planned.yaml", _planned(run_dir, stage_shards))
    decided = write_run_yaml(tmp_path / "decided.yaml", _decided(run_dir, stage_shards))
    reference = _decided(tmp_path / "reference", stage_shards)
    run_ranks(_train, world_size=2, args=(reference,))

    # 1. Launched as planned, killed -9 around step 2 (before the boundary: stage 1 ends at step 3), launched
    # again and killed around step 4 (the first step of stage 2), then resumed with the decided config.
    logs = [tmp_path / f"attempt{i}.log" for i in range(3)]
    assert _launch(planned, logs[0], kill_after_step=2) == -signal.SIGKILL
    assert _launch(planned, logs[1], kill_after_step=4) == -signal.SIGKILL
    assert _launch(decided, logs[2]) == 0, logs[2].read_text()[-3000:]
    # Where the kills landed: each resume starts from the newest complete checkpoint (one per step), at least
    # the one before the step that was logged; the decided schedule was accepted, so the planned decay (its
    # first step is step 9) had not begun. The exact steps around the boundary are resumed from in part 6.
    assert _resumed_step(logs[1]) >= 1 and 3 <= _resumed_step(logs[2]) <= 8, logs
    _assert_bitwise(_final_tensors(run_dir), _final_tensors(tmp_path / "reference"), "CLI run vs planned-that-way run")
    metrics = read_metrics(run_dir)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses == [m["loss"] for m in read_metrics(tmp_path / "reference") if "loss" in m]

    # Rounding said once at each start; the decision recorded in the log, metrics.jsonl and the checkpoint.
    rounding = "data.stages[0].until_tokens 5,000 is not a whole number of global batches (2,048 tokens): stage 1 'web' " \
               "ends at step 3, after 6,144 tokens"
    for log in logs:
        assert log.read_text().count(rounding) == 1, log.read_text()[-3000:]
    final_log = logs[2].read_text()
    assert "changed data: " in final_log and "data.stages[2] (stage 3 'tail') appended" in final_log
    assert "the decay has not begun: continuing at step" in final_log
    [change] = [m for m in metrics if "data_change" in m]
    assert change["step"] == _resumed_step(logs[2]) and change["data_allow_change"] is False
    assert "data.stages[2] (stage 3 'tail') appended" in change["data_change"]
    manifest = read_manifest(run_dir / "checkpoints" / "step_0000012")
    [schedule_change] = manifest["schedule_changes"]
    assert schedule_change["step"] == _resumed_step(logs[2]) and schedule_change["allowed_by"] is None
    assert "steps: 10 -> 12" in schedule_change["changes"] and "decay start step: 9 -> 10" in schedule_change["changes"]
    segments = manifest["data_provenance"]
    assert [s["stage"] for s in segments][-1] == 2 and segments[-1]["first_step"] == 8
    assert any("appended" in c for s in segments for c in s["data_changed"])
    assert manifest["data_stage"] == {"index": 2, "number": 3, "name": "tail", "first_step": 8, "start_samples": 7 * GB,
                                      "start_tokens": 7 * TPS, "tokens": 5 * TPS, "planned_tokens": 5 * TPS}

    # 2. The lr of every step is the wsd formula; stages begin (and stage 1's second epoch) where they should.
    assert [m["lr"] for m in metrics if "loss" in m] == pytest.approx([_lr_formula(s) for s in range(12)], rel=1e-12)
    assert [(m["step"], m["data_stage_begins"]) for m in metrics if "data_stage_begins" in m] == [(1, 1), (4, 2), (8, 3)]
    assert [(m["step"], m["data_stage"], m["data_epoch"]) for m in metrics if "data_epoch" in m] == [(3, 1, 2)]

    # 3. Replay (CLI): the stage of every step; stage 1 only from its directory, every window once in its epoch.
    lines = [json.loads(line) for line in
             _cli("megamobi.replay", str(run_dir), "--steps", "1:12", "--json").stdout.splitlines()]
    assert {r["step"]: r["stage"] for r in lines} == {s: 1 if s <= 3 else 2 if s <= 7 else 3 for s in range(1, 13)}
    stage1 = [r for r in lines if r["stage"] == 1]
    assert {r["source"] for r in stage1} == {"web"} and all(r["shard"].startswith(stage_shards["web"]) for r in stage1)
    first_epoch = Counter((r["sample_index"], r["offset"]) for r in stage1 if r["step"] <= 2)
    assert len(first_epoch) == 2 * 32 and set(first_epoch.values()) == {1}  # all 64 windows, each once
    assert all(r["shard"].startswith(stage_shards["hq"]) for r in lines if r["stage"] == 2)
    hits = RunReplay(run_dir).find(f"{stage_shards['web']}:0")["consumed"]  # in stages 1 and 3: both found
    assert [(h["step"], h["stage"], h["rank"], h["micro_batch"], h["offset"]) for h in hits] == sorted(
        (r["step"], r["stage"], r["rank"], r["micro_batch"], r["offset"]) for r in lines
        if r["shard"].startswith(stage_shards["web"]) and r["row"] == 0)
    assert {h["stage"] for h in hits} == {1, 3}
    mix = json.loads(_cli("megamobi.replay", str(run_dir), "--mix", "1:12", "--json").stdout)
    assert [(s["stage"], s["name"], s["first_step"], s["last_step"], s["tokens"]) for s in mix["stages"]] == [
        (1, "web", 1, 3, 3 * TPS), (2, "mix", 4, 7, 4 * TPS), (3, "tail", 8, 12, 5 * TPS)]
    stage2 = mix["stages"][1]["sources"]  # one whole epoch of the 3:1 blend: exactly its proportions
    assert (stage2["math"]["share"], stage2["code"]["share"]) == (0.75, 0.25)
    assert (stage2["math"]["configured"], stage2["code"]["configured"]) == (0.75, 0.25)
    assert mix["tokens"] == 12 * TPS == sum(s["tokens"] for s in mix["stages"])
    text = _cli("megamobi.replay", str(run_dir), "--mix", "1:12").stdout
    assert "stage 2 'mix', steps 4..7: 8,192 tokens" in text and "total, steps 1..12: 24,576 tokens" in text

    # 4. megamobi.checkpoints: each checkpoint's stage and how far through it.
    table = _cli("megamobi.checkpoints", str(run_dir), "--no-mix").stdout.splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert " 2 mix 50% " in rows["step_0000005"] and " 3 tail 100% " in rows["step_0000012"]

    # 5. --check-only prints the schedule; a started stage changed or a schedule changed mid-decay is refused.
    code, out, _ = _check_only(decided, capsys=capsys)
    assert code == 0
    assert "  stage 3 'tail': steps 8-12, tokens 14,336-24,576 (10.24k), lr 0.01 -> 0.004; " in out
    assert "then linear decay over steps 10-12 (3 steps) to 0.001" in out
    code, _, err = _check_only(decided, "data.stages[0].source_weights={web: 1.0}", capsys=capsys)
    assert code == 2 and "data.stages[0].source_weights: None -> {'web': 1.0}" in err and "data.allow_change" in err
    assert _check_only(decided, "data.stages[0].source_weights={web: 1.0}", "data.allow_change=true", capsys=capsys)[0] == 0
    code, _, err = _check_only(decided, "train.steps=14", capsys=capsys)
    assert code == 2 and "steps: 12 -> 14" in err and "the decay began at step 10" in err, err
    assert "optimizer.allow_schedule_change: true" in err
    code, out, _ = _check_only(decided, "train.steps=14", "optimizer.allow_schedule_change=true", capsys=capsys)
    assert code == 0 and "on resume, accepted and recorded: steps: 12 -> 14" in out

    # 6. Resumes from exactly the step before, at, and after the boundary (fork harness): the same bits.
    expected = _final_tensors(tmp_path / "reference")
    for step in (2, 3, 4):
        copy = tmp_path / f"from{step}"
        (copy / "checkpoints").mkdir(parents=True)
        shutil.copytree(run_dir / "checkpoints" / f"step_{step:07d}", copy / "checkpoints" / f"step_{step:07d}")
        run = dataclasses.replace(_decided(copy, stage_shards), checkpoint=dataclasses.replace(
            reference.checkpoint, interval_tokens=0))
        run_ranks(_train, world_size=2, args=(run,))
        _assert_bitwise(_final_tensors(copy), expected, f"resumed from step {step}")

    # 7. The loss and lr plots mark where stages 2 and 3 begin; the other plots are as without stages.
    from megamobi.plot import main as plot_main
    from megamobi.plot import stage_boundaries

    assert stage_boundaries(metrics) == [{"step": 4, "consumed_tokens": 3 * TPS, "label": "stage 2 mix"},
                                         {"step": 8, "consumed_tokens": 7 * TPS, "label": "stage 3 tail"}]
    unmarked = tmp_path / "unmarked" / "run"  # the same run without its stage records (same name: same legend)
    unmarked.mkdir(parents=True)
    (unmarked / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "data_stage_begins" not in line))
    assert plot_main([str(run_dir), "--output", str(tmp_path / "marked-plots")]) == 0
    assert plot_main([str(unmarked), "--output", str(tmp_path / "unmarked-plots")]) == 0
    for name, marked in (("loss.png", True), ("lr.png", True), ("grad_norm.png", False)):
        same = (tmp_path / "marked-plots" / name).read_bytes() == (tmp_path / "unmarked-plots" / name).read_bytes()
        assert same != marked, name
