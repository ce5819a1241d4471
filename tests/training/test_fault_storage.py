"""Storage faults through the real command line (issue 17, cases 6, 7 and 9): a checkpoints/ folder
without room or read-only is refused before any step (and by --check-only); a save that meets a
full disk or a file system turned read-only says so with the path and the free space, removes its
partial directory and leaves the previous checkpoint as `latest`; a shard cut short while the run
reads it ends the run naming the shard (never a bare SIGBUS).

Real file systems: a small tmpfs and read-only bind mounts (root is needed; skipped otherwise)."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from multiproc import free_port
from run_yaml import write_run_yaml
from training_runs import latest_name, make_run, read_metrics, wait_for

from megamobi.checkpointing.manifest import verify_checkpoint
from megamobi.checkpointing.storage import bytes_per_parameter, estimated_checkpoint_bytes
from megamobi.data.indexed_format import SAMPLE_BYTES
from megamobi.exit_codes import SAVE_FAILED, USAGE
from megamobi.model import parameter_counts

REPO = Path(__file__).resolve().parents[2]
EVERY_2_STEPS = 2 * 8 * 32  # interval_tokens: global batch 8 x 32 tokens


def _mount(*args: str) -> None:
    if subprocess.run(["mount", *args], capture_output=True).returncode:
        pytest.skip(f"cannot `mount {' '.join(args)}` here (needs root)")


@contextmanager
def _tmpfs(path: Path, *, size: int):
    """A real file system of `size` bytes at `path`, which a save can fill."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


@contextmanager
def _read_only(path: Path):
    """`path` bind-mounted read-only onto itself: root can write to a chmod 555 folder, not to this."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               NPROC_PER_NODE="1", MASTER_PORT=str(free_port()))
    env.update(extra)
    return env


def _launch(run_yaml: Path, **env) -> subprocess.Popen:
    """`bash launch/pretrain.sh RUN.yaml` on one CPU rank, as a user starts it."""
    return subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml)], cwd=run_yaml.parent,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    return output


def _check_only(run_yaml: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(run_yaml)],
                          cwd=REPO, capture_output=True, text=True, env={**_env(), "WORLD_SIZE": "1"})


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("megamobi: error:")]


def _logged_steps(run_dir: Path) -> list[int]:
    return [m["step"] for m in read_metrics(run_dir) if "loss" in m] if (run_dir / "metrics.jsonl").is_file() else []


def test_checkpoint_size_estimate_matches_a_real_checkpoint(tmp_path, token_shards):
    """The estimate the start check uses, against the sizes measured (tests/training: 1 rank, fp32, ZeRO-1:
    DeepSpeed 4 + 12 bytes a parameter, the portable files 4 + 8)."""
    run = make_run(tmp_path / "r", token_shards)
    assert bytes_per_parameter(precision="fp32", zero_stage=1) == 28
    assert bytes_per_parameter(precision="bf16", zero_stage=1) == 26
    assert bytes_per_parameter(precision="fp32", zero_stage=0) == 24
    params = parameter_counts(run.model_config)["params_unique"]
    assert 28 * params < estimated_checkpoint_bytes(run, world_size=1) < 28 * params * 1.1 + (400 << 10)
    # Two pipeline stages: the shared FFN's second copy in DeepSpeed's files (16 bytes a parameter in fp32).
    staged = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, pipeline=2))
    mlp = parameter_counts(run.model_config)["params_mlp_unique"]
    assert estimated_checkpoint_bytes(staged, world_size=2) - estimated_checkpoint_bytes(run, world_size=2) == \
        int((28 * params + 16 * mlp) * 1.1) - int(28 * params * 1.1)


def test_no_room_or_read_only_is_refused_before_any_step(tmp_path, token_shards):
    run = make_run(tmp_path / "run", token_shards, checkpoint={"interval_tokens": EVERY_2_STEPS})
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    checkpoints = tmp_path / "run" / "checkpoints"
    with ExitStack() as mounts:
        # 1: a checkpoints/ file system with 64 KiB: the tiny model's checkpoint needs ~1.8 MiB.
        mounts.enter_context(_tmpfs(checkpoints, size=64 << 10))
        checked = _check_only(run_yaml)
        assert checked.returncode == USAGE and "Traceback" not in checked.stderr, checked.stderr
        [line] = _error_lines(checked.stderr)
        assert f"storage: {checkpoints} has 64.0 KiB free, but one more checkpoint needs about" in line, line
        assert "parameters, fp32, ZeRO-1, 1 rank(s)" in line
        proc = _launch(run_yaml)
        output = _finish(proc)
        assert proc.returncode == USAGE and f"storage: {checkpoints} has 64.0 KiB free" in output, output[-2000:]
        assert "Traceback" not in output and not (tmp_path / "run" / "metrics.jsonl").exists()  # no step spent
        mounts.close()

        # 2: run_dir read-only (a bind mount: root passes os.access, and chmod stops no root).
        (tmp_path / "run").mkdir(exist_ok=True)
        mounts.enter_context(_read_only(tmp_path / "run"))
        checked = _check_only(run_yaml)
        assert checked.returncode == USAGE, checked.stderr
        [line] = _error_lines(checked.stderr)
        assert f"storage: {tmp_path / 'run'} is read-only (permission denied: read-only file system)" in line, line
        assert "free there" in line and "Traceback" not in checked.stderr
        proc = _launch(run_yaml)
        output = _finish(proc)
        assert proc.returncode == USAGE and "is read-only" in output and "Traceback" not in output, output[-2000:]
        mounts.close()

        # 3: run_dir writable, only checkpoints/ read-only.
        checkpoints.mkdir(parents=True, exist_ok=True)
        mounts.enter_context(_read_only(checkpoints))
        checked = _check_only(run_yaml)
        assert checked.returncode == USAGE and f"storage: {checkpoints} is read-only" in checked.stderr, checked.stderr
        mounts.close()

    # 4: a file where the checkpoints folder belongs.
    shutil.rmtree(checkpoints)
    checkpoints.write_text("not a folder")
    checked = _check_only(run_yaml)
    assert checked.returncode == USAGE and f"storage: {checkpoints} is a file" in checked.stderr, checked.stderr
    checkpoints.unlink()
    assert _check_only(run_yaml).returncode == 0
    assert not list((tmp_path / "run").glob("**/.megamobi-write-test-*"))  # the probes are removed


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, token_shards):
    """Room for the start check (an estimate of one checkpoint) and step 2's checkpoint, not step 4's."""
    run = make_run(tmp_path / "run", token_shards, train={"steps": 6, "seed": 11, "log_interval": 1},
                   checkpoint={"interval_tokens": EVERY_2_STEPS})
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    checkpoints = tmp_path / "run" / "checkpoints"
    size = int(estimated_checkpoint_bytes(run, world_size=1) * 1.4)
    with _tmpfs(checkpoints, size=size):
        proc = _launch(run_yaml)
        output = _finish(proc)
        assert proc.returncode == SAVE_FAILED, output[-3000:]
        assert "Traceback" not in output and "unexpected pos" not in output, output[-3000:]
        [line] = _error_lines(output)
        assert "checkpoint step_0000004 NOT saved: rank 0: disk full writing " + str(checkpoints / ".step_0000004.partial") in line, line
        assert "free on its file system" in line and "`latest` still names step_0000002" in line, line
        assert "exit status 74" in output  # launch/pretrain.sh's last line
        assert latest_name(checkpoints) == "step_0000002" and verify_checkpoint(checkpoints / "step_0000002") == []
        assert not list(checkpoints.glob(".step_*")) and not (checkpoints / "step_0000004").exists()
        assert _logged_steps(tmp_path / "run") == [1, 2, 3, 4]  # stopped at the failed save, not trained on
        # Started again: the start check now knows the real size of a checkpoint, and there is no room for it.
        checked = _check_only(run_yaml)
        assert checked.returncode == USAGE, checked.stderr
        [line] = _error_lines(checked.stderr)
        assert "(the size of step_0000002)" in line and f"storage: {checkpoints} has " in line, line


def test_checkpoints_turned_read_only_during_a_background_save(tmp_path, token_shards):
    """checkpoint.async: step 2 is saved, then the file system turns read-only: step 4's save fails,
    every rank stops (2 ranks), `latest` stays step 2."""
    run = make_run(tmp_path / "run", token_shards, train={"steps": 6, "seed": 11, "log_interval": 1},
                   checkpoint={"interval_tokens": EVERY_2_STEPS, "async": True})
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    checkpoints = tmp_path / "run" / "checkpoints"
    with _tmpfs(checkpoints, size=64 << 20):
        # Steps of ~0.4 s, saves of 1 s: time to turn the file system read-only between the two saves.
        proc = _launch(run_yaml, NPROC_PER_NODE="2", MEGAMOBI_FAULTS="slow:rank=0:ms=400",
                       MEGAMOBI_TEST_SAVE_DELAY_S="1")
        wait_for(proc, lambda: latest_name(checkpoints) == "step_0000002")
        _mount("-o", "remount,ro", str(checkpoints))
        output = _finish(proc)
        assert proc.returncode == SAVE_FAILED, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        # Whichever rank exits first ends the launch (the launcher stops the other): its line says why.
        said = re.compile(r"megamobi: error: checkpoint step_0000004 NOT saved: rank [01]: permission denied \(read-only "
                          rf"file system\) writing {re.escape(str(checkpoints))}/\S+ \(\S+ \S+ free on its file system\)")
        lines = [line for line in _error_lines(output) if said.search(line)]
        assert lines and "`latest` still names step_0000002" in lines[0], output[-3000:]
        assert latest_name(checkpoints) == "step_0000002" and verify_checkpoint(checkpoints / "step_0000002") == []
        assert not (checkpoints / "step_0000004").exists()
        assert max(_logged_steps(tmp_path / "run")) < 6  # the run stopped; it did not train on unsaved


def test_shard_truncated_while_running_is_named(tmp_path, token_shards):
    data = shutil.copytree(token_shards, tmp_path / "shards")
    run = make_run(tmp_path / "run", data, train={"steps": 6, "seed": 11, "log_interval": 1},
                   checkpoint={"interval_tokens": EVERY_2_STEPS})
    run_yaml = write_run_yaml(tmp_path / "run.yaml", dataclasses.replace(run))
    victim = sorted(data.glob("*.bin"))[0]
    proc = _launch(run_yaml, MEGAMOBI_FAULTS="slow:rank=0:ms=500", NPROC_PER_NODE="2")  # both ranks read it
    wait_for(proc, lambda: 1 in _logged_steps(tmp_path / "run"))
    os.truncate(victim, SAMPLE_BYTES)  # 20 samples' worth cut to 1, as a re-run preprocessor would
    output = _finish(proc)
    assert proc.returncode == USAGE and proc.returncode != 135, output[-3000:]
    assert "Traceback" not in output and "Bus error" not in output and "SIGBUS" not in output, output[-3000:]
    line, *peer = _error_lines(output)  # the peer, if the launcher did not stop it first: one line, no traceback
    assert f"shard {victim} is now {SAMPLE_BYTES} bytes, shorter than its index (20 samples" in line, line
    assert all("another rank ended during a collective" in other for other in peer), peer
    assert "rank 0 (local rank 0) failed first: exit status 2" in output.splitlines()[-1] or \
        "rank 1 (local rank 1) failed first: exit status 2" in output.splitlines()[-1], output[-1000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert latest_name(checkpoints) is None or verify_checkpoint(checkpoints / latest_name(checkpoints)) == []


def test_a_shard_cut_short_under_an_open_dataset_is_named_not_a_sigbus(tmp_path, token_shards):
    """The read path itself (no run): a memory map would SIGBUS here and kill pytest."""
    from megamobi.data import ShardError
    from megamobi.data.shard_dataset import ShardedDataset
    from megamobi.data.shard_reader import shards_shorter_than_index

    data = shutil.copytree(token_shards, tmp_path / "shards")
    dataset = ShardedDataset([data])
    first = dataset[0].copy()
    victim = dataset.bin_paths[0]
    assert shards_shorter_than_index([data]) == []
    os.truncate(victim, SAMPLE_BYTES + 10)
    assert (dataset[0] == first).all()  # what is still there reads as before
    with pytest.raises(ShardError, match=rf"shard {re.escape(str(victim))} is now {SAMPLE_BYTES + 10} bytes, "
                                         r"shorter than its index \(20 samples"):
        dataset[5]
    [problem] = shards_shorter_than_index([data])
    assert problem.startswith(f"shard {victim} is now {SAMPLE_BYTES + 10} bytes")


def test_exit_statuses_in_words():
    from megamobi.rank_failure import describe_status

    assert describe_status(SAVE_FAILED) == "exit status 74 (a checkpoint could not be saved)"
    assert "a memory-mapped file was cut short" in describe_status(135)
