"""Issue 17's resume faults through the real CLI (`launch/pretrain.sh`, `megamobi.launcher node`,
`megamobi.pretrain --check-only`), one rank, the test model:

- every checkpoint damaged (one byte of each RNG file): exit 2 listing each and why, at --check-only and
  in the ranks' own verification; nothing trained, nothing deleted, metrics.jsonl unchanged. With
  checkpoint.restart_from_scratch: true the old checkpoints and logs are moved aside, and the run trains
  from step 1 exactly as the first time; the key's bad values end with exit 2 and one line;
- the newest checkpoint's megamobi.json damaged and the one before it missing: a fall back to the one
  before those, with one line each, and a resume bitwise equal to the uninterrupted run;
- a torn last line of metrics.jsonl and events.jsonl is cut off with one line; a damaged line before
  the last is an exit-2 error naming the file and line.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import make_run, read_metrics

from megamobi.checkpointing.model_files import read_full_tensors
from megamobi.config_io import ConfigError
from megamobi.pretrain import main as pretrain_main
from megamobi.training.append_logs import DamagedLogLine, fix_tail, truncate_metrics

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
EVERY_2_STEPS = {"interval_tokens": 2 * 8 * 32}  # the test runs' 8 sequences x 32 tokens a step
TIMING = ("tokens_per_s", "tokens_per_s_per_device", "step_time_s", "memory_gb", "memory_gb_max")


def _train(rank, run, stop_after=None):
    """The run, stopped by a real SIGUSR1 (SLURM's time-limit warning) after step `stop_after`: it saves there."""
    from megamobi.training.loop import Trainer

    class StoppedAt(Trainer):
        def _log_step(self, **kwargs):
            super()._log_step(**kwargs)
            if self.state.step == stop_after:
                os.kill(os.getpid(), signal.SIGUSR1)

    StoppedAt(run).train()


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    env.update(PYTHON=sys.executable, PATH=f"{VENV_BIN}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               NPROC_PER_NODE="1", MASTER_PORT=str(free_port()))
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A real command line, stdout and stderr together."""
    proc = subprocess.run(list(args), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=400)
    assert "Traceback" not in proc.stdout, proc.stdout
    return proc


def _pretrain_sh(run_yaml: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _cli("bash", str(REPO / "launch/pretrain.sh"), str(run_yaml), *overrides, cwd=run_yaml.parent)


def _check_only(run_yaml: Path, *overrides: str) -> subprocess.CompletedProcess:
    return _cli(sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(run_yaml), *overrides,
                cwd=run_yaml.parent)


def _flip_byte(path: Path, offset: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _without_timing(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in read_metrics(run_dir)]


def test_every_checkpoint_damaged_is_refused_and_a_restart_moves_them_aside(tmp_path, token_shards, capsys, monkeypatch):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 6, "log_interval": 1}, checkpoint=EVERY_2_STEPS)
    run_ranks(_train, world_size=1, args=(run, 4))  # stopped after step 4: training left to do
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    run_dir, root = tmp_path / "r", tmp_path / "r" / "checkpoints"
    monkeypatch.setenv("WORLD_SIZE", "1")  # for the in-process --check-only below
    first_pass = _without_timing(run_dir)
    for step in (2, 4):
        _flip_byte(root / f"step_{step:07d}" / "rng" / "rank00000.json")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    damaged = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def assert_refused(proc):
        assert proc.returncode == 2, proc.stdout
        assert f"{run_dir} holds 2 checkpoint(s) and none can be resumed" in proc.stdout, proc.stdout
        for step in (2, 4):
            assert f"step_{step:07d}: rng/rank00000.json: sha256 differs from the manifest" in proc.stdout
        assert "checkpoint.restart_from_scratch: true" in proc.stdout and "Nothing was changed" in proc.stdout
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == damaged  # nothing deleted or written
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics

    # launch/pretrain.sh: its --check-only verifies the checksums and refuses before any rank starts.
    assert_refused(_pretrain_sh(run_yaml))
    # The rank's own (collective) verification, without the check: the same refusal, no step trained.
    proc = _cli(sys.executable, "-m", "megamobi.launcher", "node", str(run_yaml), cwd=tmp_path)
    assert_refused(proc)
    assert "step      1/" not in proc.stdout

    proc = _check_only(run_yaml, "checkpoint.restart_from_scratch=maybe")
    assert proc.returncode == 2 and len(proc.stdout.strip().splitlines()) == 1, proc.stdout
    assert "checkpoint.restart_from_scratch: expected true or false, got 'maybe'" in proc.stdout
    for bad, said in (("1", "got 1"), ("0", "got 0"), ("null", "got None"), ("[]", "got []"), ("{}", "got {}")):
        assert pretrain_main(["--check-only", "--config", str(run_yaml), f"checkpoint.restart_from_scratch={bad}"]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint.restart_from_scratch: expected true or false, {said}" in err and len(err.splitlines()) == 1, err

    proc = _pretrain_sh(run_yaml, "checkpoint.restart_from_scratch=true")
    assert proc.returncode == 0, proc.stdout
    [discarded] = run_dir.glob("discarded-*")
    assert (f"checkpoint.restart_from_scratch: moved checkpoints, metrics.jsonl into {discarded} (nothing was deleted)"
            in proc.stdout), proc.stdout
    assert {discarded / "checkpoints" / p.relative_to(root): b for p, b in damaged.items()} == {
        p: p.read_bytes() for p in (discarded / "checkpoints").rglob("*") if p.is_file()}
    assert (discarded / "metrics.jsonl").read_bytes() == metrics
    # Trained from step 1: the same steps, bit for bit, as the first time.
    assert _without_timing(run_dir)[:4] == first_pass and [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000002", "step_0000004", "step_0000006"]


def test_damaged_newest_manifests_fall_back_and_torn_log_lines_are_cut(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, train={"steps": 6, "log_interval": 1}, checkpoint=EVERY_2_STEPS)
    run_ranks(_train, world_size=1, args=(run,))
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    run_dir, root = tmp_path / "r", tmp_path / "r" / "checkpoints"
    uninterrupted = _without_timing(run_dir)
    final = {kind: read_full_tensors(root / "step_0000006", kind) for kind in ("model", "optimizer")}
    newest = root / "step_0000006" / "megamobi.json"
    newest.write_bytes(newest.read_bytes()[:200])  # cut short (a copy that failed, a bad block)
    (root / "step_0000004" / "megamobi.json").unlink()
    metrics, events = run_dir / "metrics.jsonl", run_dir / "events.jsonl"
    whole = metrics.read_bytes()

    # A damaged line before the last: refused, naming the file and line; nothing changed.
    lines = whole.splitlines(keepends=True)
    metrics.write_bytes(b"".join(lines[:2]) + b'{"step": 3, "consu\n' + b"".join(lines[3:]))
    proc = _check_only(run_yaml)
    assert proc.returncode == 2 and f"{metrics}: line 3 (at byte {len(lines[0]) + len(lines[1])})" in proc.stdout, proc.stdout
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout

    # Torn last lines (a full disk during the write): cut off on resume, with one line each.
    metrics.write_bytes(whole + b'{"step": 7, "consumed_samples": 5')
    events.write_bytes(b'{"step": 1, "kind": "transient", "ranks": [0]}\n{"step": 2, "ki')
    proc = _check_only(run_yaml)
    assert proc.returncode == 0, proc.stdout
    assert f"on resume: skipping checkpoint {root / 'step_0000006'}: megamobi.json is damaged" in proc.stdout
    assert f"on resume: skipping checkpoint {root / 'step_0000004'}: no megamobi.json" in proc.stdout
    assert f"on resume: falling back to {root / 'step_0000002'}" in proc.stdout
    assert f"{metrics}: its torn last line (33 bytes at byte {len(whole)}) will be cut off" in proc.stdout

    proc = _pretrain_sh(run_yaml)
    assert proc.returncode == 0, proc.stdout
    out = proc.stdout
    assert f"skipping checkpoint {root / 'step_0000006'}: {newest}: damaged (JSONDecodeError" in out, out
    assert f"skipping checkpoint {root / 'step_0000004'}: no megamobi.json" in out
    assert f"resumed from {root / 'step_0000002'} at step 2" in out
    assert (f"{metrics}: cut off a torn last line at byte {len(whole)} (33 bytes: "
            "'{\"step\": 7, \"consumed_samples\": 5')") in out
    assert f"{events}: cut off a torn last line at byte 47" in out
    assert events.read_text().splitlines()[0] == '{"step": 1, "kind": "transient", "ranks": [0]}'
    assert all(json.loads(line) for line in events.read_text().splitlines())
    # Bitwise what the uninterrupted run logged and saved.
    assert _without_timing(run_dir) == uninterrupted
    for kind, expected in final.items():
        got = read_full_tensors(root / "step_0000006", kind)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), kind


def test_torn_tails_in_detail(tmp_path):
    """The cases of a torn last line, on real files: what is cut, what is kept, what is refused."""
    good = b'{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n'
    path = tmp_path / "metrics.jsonl"
    said = []
    for tail, kept in ((b"", good), (b'{"step": 3, "lo', good), (b"\0" * 30, good), (b"\0" * 30 + b"\n", good),
                       (b'{"step": 3, "loss": 2.3}', good + b'{"step": 3, "loss": 2.3}\n')):  # only the newline lost
        path.write_bytes(good + tail)
        fix_tail(path, report=said.append)
        assert path.read_bytes() == kept, tail
    assert len(said) == 3 and all(f"{path}: cut off a torn last line at byte {len(good)}" in s for s in said)
    path.write_bytes(good + b'{"step": 3, "lo')
    truncate_metrics(path, after_step=1, report=said.append)
    assert path.read_bytes() == b'{"step": 1, "loss": 2.5}\n' and len(said) == 4
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DamagedLogLine, match=r"metrics.jsonl: line 2 \(at byte 12\) is not a log record") as err:
        fix_tail(path, report=said.append)
    assert isinstance(err.value, ConfigError) and path.read_bytes() == b'{"step": 1}\nnot json\n{"step": 2}\n'


def test_model_from_checkpoint_with_no_usable_checkpoint_lists_them(tmp_path, token_shards, capsys, monkeypatch):
    """`model: from_checkpoint` reads the newest usable checkpoint's model; none usable: the same refusal."""
    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_run(tmp_path / "r", token_shards))
    (tmp_path / "r" / "checkpoints" / "step_0000004").mkdir(parents=True)  # its megamobi.json lost
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert pretrain_main(["--check-only", "--config", str(run_yaml), "model=from_checkpoint"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'r'} holds 1 checkpoint(s) and none can be resumed:\n  step_0000004: no megamobi.json" in err, err
    assert "Traceback" not in err and (tmp_path / "r" / "checkpoints" / "step_0000004").is_dir()
