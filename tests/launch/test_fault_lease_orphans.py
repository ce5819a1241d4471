"""Issue 17 cases 4 and 5, through the real CLI on 2 CPU ranks: a second job on a run_dir that a live
job holds is refused (exit 2, naming the holder) by `--check-only` and by its own rank 0; a lease
left by a job that died is taken over with one line; the ranks of a SIGKILLed megamobi.launcher, and
of a `deepspeed` command stopped by SIGTERM, save a checkpoint and stop instead of training on."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from launch_runs import launch_env, relative_run
from multiproc import free_port

from megamobi.checkpointing.manifest import verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "launch/pretrain.sh")
SLOW = "slow:rank=0:ms=150"  # a few steps a second: the run is still going when the second job comes


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, steps: int) -> None:
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.2)


def _wait_until_gone(pids: list[int], *, within_s: float) -> float:
    start = time.monotonic()
    while any(_alive(pid) for pid in pids) and time.monotonic() - start < within_s:
        time.sleep(0.1)
    survivors = [f"{pid}: {_cmdline(pid)[:200]}" for pid in pids if _alive(pid)]
    assert not survivors, f"still running {within_s} s later: {survivors}"
    return time.monotonic() - start


def _saved_at_stop(run_dir: Path, output: str, *, signal_name: str = "SIGTERM") -> int:
    """The run stopped after a clean save: one metrics line per step up to the checkpoint's step."""
    stops = [line for line in output.splitlines() if f"megamobi: stopped early by {signal_name} at step" in line]
    assert len(stops) == 1, output[-4000:]
    step = int(stops[0].split(" at step ")[1].split()[0])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{step:07d}", (latest, step)
    assert verify_checkpoint(run_dir / "checkpoints" / latest) == []
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, step + 1)), steps
    return step


def test_second_job_refused_stale_lease_taken_over_and_a_killed_launcher_leaves_no_rank(tmp_path, token_shards):
    relative_run(tmp_path, token_shards, steps=100000)
    run_dir = tmp_path / "run"
    env = launch_env(NPROC_PER_NODE="2", PYTHONPATH=str(REPO))
    # A job that died holding the lease (SIGKILL: no clean release), as a crashed rank 0 leaves it.
    dead = subprocess.Popen([sys.executable, "-c", "import os, signal\nfrom megamobi.training.run_lease import RunLease\n"
                             "RunLease('run').take()\nos.kill(os.getpid(), signal.SIGKILL)"], cwd=tmp_path, env=env)
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert json.loads((run_dir / "lease.lock").read_text())["pid"] == dead.pid

    first = subprocess.Popen(["bash", SCRIPT, "run.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**env, "MASTER_PORT": str(free_port()), "MEGAMOBI_FAULTS": SLOW})
    _wait_for_steps(first, run_dir / "metrics.jsonl", 2)
    holder = json.loads((run_dir / "lease.lock").read_text())
    named = f"run is in use by another job: pid {holder['pid']} on host {socket.gethostname()}, since {holder['since']}"

    # The same command again, another MASTER_PORT: refused by its --check-only, before any rank starts.
    second = subprocess.run(["bash", SCRIPT, "run.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**env, "MASTER_PORT": str(free_port())})
    assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
    assert named in second.stderr and "another run_dir" in second.stderr, second.stderr
    assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr
    # The ranks refuse by themselves too (a launch without the check, e.g. the deepspeed command): rank 0
    # exits 2 before the rendezvous, and the launcher's last line names it.
    ranks = subprocess.run([sys.executable, "-m", "megamobi.launcher", "node", "run.yaml"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=180, env={**env, "MASTER_PORT": str(free_port())})
    assert ranks.returncode == 2, ranks.stderr[-3000:]
    last = ranks.stderr.strip().splitlines()[-1]
    assert last.startswith("megamobi.launcher: rank 0 (local rank 0) failed first: exit status 2") and named in last, last
    assert "Traceback" not in ranks.stderr

    # SIGKILL the first job's megamobi.launcher: its ranks save and stop within 10 s.
    launcher = next(pid for pid in _children(first.pid) if "megamobi.launcher" in _cmdline(pid))
    rank_pids = _children(launcher)
    assert len(rank_pids) == 2 and all("megamobi.pretrain" in _cmdline(pid) for pid in rank_pids)
    os.kill(launcher, signal.SIGKILL)
    _wait_until_gone(rank_pids, within_s=10)
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGKILL, output[-3000:]
    assert "megamobi.launcher itself was killed: its ranks save a checkpoint and stop on their own" in output
    takeovers = [line for line in output.splitlines() if "took over the lease" in line]
    assert len(takeovers) == 1, takeovers
    assert takeovers[0].startswith(f"[megamobi] took over the lease on run from pid {dead.pid} on host "
                                   f"{socket.gethostname()}, since "), takeovers
    assert "that job is gone" in takeovers[0]
    assert f"megamobi.launcher (pid {launcher}) is gone: saving a checkpoint and stopping" in output, output[-3000:]
    assert "Traceback" not in output and "BrokenPipe" not in output
    _saved_at_stop(run_dir, output)
    assert (run_dir / "lease.lock").read_text() == ""  # released cleanly: the next start takes it without a word


def test_sigterm_to_the_deepspeed_command_reaches_the_ranks(tmp_path, token_shards):
    """`deepspeed` on one machine installs no SIGTERM handler: it dies at once, and until now its
    per-node launcher and the ranks trained on. The ranks watch it: they save and stop."""
    relative_run(tmp_path, token_shards, steps=100000)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), SCRIPT, "run.yaml"],
                            cwd=tmp_path, env=launch_env(MEGAMOBI_FAULTS=SLOW), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for_steps(proc, run_dir / "metrics.jsonl", 2)
    node_launcher = next(pid for pid in _children(proc.pid) if "deepspeed.launcher.launch" in _cmdline(pid))
    rank_pids = _children(node_launcher)
    assert len(rank_pids) == 2
    proc.send_signal(signal.SIGTERM)
    _wait_until_gone(rank_pids, within_s=10)
    _wait_until_gone([node_launcher], within_s=10)  # it exits once its ranks have (status 75)
    output, _ = proc.communicate(timeout=60)
    assert f"the deepspeed command (pid {proc.pid}) is gone: saving a checkpoint and stopping" in output, output[-3000:]
    assert "Traceback" not in output
    _saved_at_stop(run_dir, output)


def test_a_run_dir_that_is_a_file_stops_rank_0_in_one_line(tmp_path, token_shards):
    relative_run(tmp_path, token_shards)
    (tmp_path / "afile").write_text("not a folder")
    out = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--config", "run.yaml", "run_dir=afile"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env=launch_env(PYTHONPATH=str(REPO), WORLD_SIZE="1"))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip() == ("megamobi: error: storage: run_dir afile is a file, not a folder: give the run a folder (a new "
                                  "one, or the run's own) as run_dir"), out.stderr
    assert (tmp_path / "afile").read_text() == "not a folder"


def test_sigkill_of_the_launch_script_stops_its_launcher_and_ranks(tmp_path, token_shards):
    """`kill -9` of `bash launch/pretrain.sh` (it can forward nothing then): megamobi.launcher sees it gone
    and forwards SIGTERM; the ranks stop (here while starting; a training rank saves first, as on any
    SIGTERM the launcher forwards)."""
    relative_run(tmp_path, token_shards, steps=100000)
    proc = subprocess.Popen(["bash", SCRIPT, "run.yaml"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=launch_env(NPROC_PER_NODE="2", MASTER_PORT=str(free_port())))
    deadline = time.monotonic() + 120
    while True:
        launchers = [pid for pid in _children(proc.pid) if "megamobi.launcher node" in _cmdline(pid)]
        ranks = _children(launchers[0]) if launchers else []
        if len(ranks) == 2:
            break
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _wait_until_gone([*launchers, *ranks], within_s=10)
    output, _ = proc.communicate(timeout=30)
    assert f"megamobi.launcher: launch/pretrain.sh (pid {proc.pid}) is gone: the ranks save a checkpoint and stop" \
        in output, output[-3000:]
