"""Real launches on this machine, as users type them: the `deepspeed` CLI running launch/pretrain.sh
as Python on 2 CPU ranks, and `bash launch/pretrain.sh` stopped by SIGTERM in the middle of a
deliberately slow checkpoint save (longer than DeepSpeed's 30 s grace): the save finishes."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from launch_runs import launch_env as _env
from launch_runs import relative_run as _relative_run
from multiproc import free_port, run_ranks

from megamobi.checkpointing.manifest import verify_checkpoint
from megamobi.exit_codes import STOPPED_AFTER_SAVE

REPO = Path(__file__).resolve().parents[2]


def _reference_losses(run_yaml: Path, cwd: Path, steps: int) -> list[float]:
    """The same run on this machine through the fork harness (2 ranks, same layout): bitwise equal."""
    return run_ranks(_train_reference, world_size=2, args=(str(run_yaml), str(cwd), steps))[0]


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def _train_reference(rank, run_yaml, cwd, steps):
    from megamobi.training.loop import Trainer
    from megamobi.training.run_config import load_run_config

    run = load_run_config(run_yaml, [f"run_dir={cwd}/reference", f"data.paths=[{cwd}/shards]", f"train.steps={steps}"])
    Trainer(run).train()
    return train_losses(Path(cwd) / "reference") if rank == 0 else None


def test_deepspeed_cli_runs_launch_script_on_two_ranks(tmp_path, token_shards):
    """`deepspeed --num_gpus 2 launch/pretrain.sh RUN.yaml overrides`: DeepSpeed starts
    `python -u launch/pretrain.sh --local_rank=K ...`, which runs megamobi.pretrain; relative paths
    resolve from the directory the user ran it in."""
    run_yaml = _relative_run(tmp_path, token_shards)
    port = free_port()
    out = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), str(REPO / "launch/pretrain.sh"),
                          "run.yaml", "train.steps=4"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "layout T=1 P=1 D=2" in out.stdout + out.stderr
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 4
    assert losses == _reference_losses(run_yaml, tmp_path, steps=4)


def test_python_half_of_the_launch_script(tmp_path, token_shards):
    run_yaml = _relative_run(tmp_path, token_shards)
    out = subprocess.run([sys.executable, str(REPO / "launch/pretrain.sh"), "--local_rank=0", "run.yaml",
                          "--check-only"], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"{run_yaml.name} is valid for 1 process(es)" in out.stdout
    out = subprocess.run([sys.executable, str(REPO / "launch/pretrain.sh")], env=_env(), capture_output=True, text=True)
    assert out.returncode == 2 and "usage: deepspeed" in out.stderr
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "--help"], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0 and "sbatch launch/pretrain.sh" in out.stdout


def test_sigterm_during_a_slow_save_lets_the_save_finish(tmp_path, token_shards):
    """SIGTERM to `bash launch/pretrain.sh` (what a terminal, a container runtime or a scheduler sends):
    the ranks save, and the launcher waits however long that takes (here 32 s, past the 30 s after
    which DeepSpeed's own launcher would SIGKILL them). Exit status 75 and a last line that says so."""
    _relative_run(tmp_path, token_shards, steps=100000)
    delay = 32
    proc = subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), "run.yaml"], cwd=tmp_path,
                            env=_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
                                     MEGAMOBI_TEST_SAVE_DELAY_S=str(delay)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == STOPPED_AFTER_SAVE, output[-3000:]
    assert time.monotonic() - signalled > delay  # the slow save really ran, and nothing cut it short
    lines = [line for line in output.splitlines() if line.strip()]
    assert "stopped early" in lines[-1] and "exit status 75" in lines[-1], lines[-3:]
    assert any("stopped early by SIGTERM at step" in line for line in lines)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and verify_checkpoint(checkpoints[0]) == []
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == checkpoints[0].name
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_*.partial"))


def test_master_port_in_use_stops_the_launch_with_its_name(tmp_path, token_shards):
    """Rank 0 cannot listen on MASTER_PORT: it says so (exit 2); the launcher stops the rank still
    waiting at the rendezvous instead of letting it wait out the timeout."""
    import socket

    _relative_run(tmp_path, token_shards)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "run.yaml"], cwd=tmp_path, capture_output=True,
                             text=True, env=_env(NPROC_PER_NODE="2", MASTER_PORT=str(port)), timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    reason = f"rank 0 cannot listen on MASTER_PORT {port}: the port is already in use"
    assert reason in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 120  # not the 600 s rendezvous timeout
    # Issue 20 case 15: the last line names the rank that failed first and its own words, not the
    # other rank's exit after the launcher stopped it.
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("megamobi.launcher: rank 0 (local rank 0) failed first: exit status 2 (a user error "
                           "caught before training); its last line: \"megamobi: error: ") and reason in last, last
    assert last.endswith("this node's 1 other rank(s) were stopped after it"), last


def test_ctrl_c_on_a_local_run_without_master_port(tmp_path, token_shards):
    """Issue 20 cases 15 and 16: with MASTER_PORT unset outside SLURM the launcher picks a free port, so
    a run starts although 29500 (torch's usual default) is busy; Ctrl-C (SIGINT) stops it after a
    clean save and the log names SIGINT, the signal received."""
    import socket

    _relative_run(tmp_path, token_shards, steps=100000)
    with socket.socket() as busy:
        try:
            busy.bind(("", 29500))
            busy.listen()
        except OSError:
            pass  # already taken by someone else on this machine: busy either way
        proc = subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), "run.yaml"], cwd=tmp_path,
                                env=_env(NPROC_PER_NODE="2"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=240)
    assert proc.returncode == STOPPED_AFTER_SAVE, output[-3000:]
    assert "29500" not in output and "Traceback" not in output
    assert any("SIGINT received: saved a checkpoint at step" in line for line in output.splitlines()), output[-3000:]
    assert "SIGTERM" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert any("megamobi: stopped early by SIGINT at step" in line for line in lines)
    assert "stopped early" in lines[-1], lines[-3:]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1 and verify_checkpoint(checkpoints[0]) == []
