"""Checkpoint files hashed while written, and `checkpoint.async: true` through the real launch script:
kill -9 in the middle of a background save, a SIGTERM-triggered save, a failed background save on a
full disk, and a bitwise resume against an uninterrupted run."""

import dataclasses
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import safetensors.torch
import torch
from multiproc import free_port, run_ranks
from run_yaml import write_run_yaml
from training_runs import descendants, latest_name, make_run, train_losses, wait_for

from megamobi.checkpointing.hashed_files import FileDigests, safetensors_save_hashed, torch_save_hashed
from megamobi.checkpointing.manifest import read_manifest, verify_checkpoint
from megamobi.checkpointing.model_files import read_full_tensors
from megamobi.exit_codes import STOPPED_AFTER_SAVE
from megamobi.files import sha256_file
from megamobi.training.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
EVERY_2_STEPS = 2 * 8 * 32  # interval_tokens: global batch 8 x 32 tokens


def test_files_hashed_while_written_read_back_the_same(tmp_path):
    tensors = {"w": torch.randn(3, 5), "b16": torch.randn(7).to(torch.bfloat16), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "ids": torch.arange(6).reshape(2, 3)}
    digests = FileDigests(tmp_path)
    safetensors_save_hashed(tensors, tmp_path / "a" / "t.safetensors", digests, metadata={"k": "v"})
    torch_save_hashed({"x": torch.randn(1 << 19), "y": [1, "two"]}, tmp_path / "b.pt", digests)  # 2 MiB: overlapped
    loaded = safetensors.torch.load_file(tmp_path / "a" / "t.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert set(digests.files) == {"a/t.safetensors", "b.pt"}
    for name, entry in digests.files.items():
        assert entry == {"bytes": (tmp_path / name).stat().st_size, "sha256": sha256_file(tmp_path / name)}


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
    env.update(PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), **extra)
    return env


def _launch(run_yaml: Path, **env) -> subprocess.Popen:
    """`bash launch/pretrain.sh RUN.yaml` on 2 CPU ranks, as a user starts it (its own process group)."""
    return subprocess.Popen(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml)], cwd=run_yaml.parent,
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _train(rank, run):
    Trainer(run).train()


def test_async_save_killed_signalled_and_resumed_bitwise(tmp_path, token_shards):
    reference = make_run(tmp_path / "reference", token_shards, train={"steps": STEPS, "seed": 11, "log_interval": 1},
                         checkpoint={"interval_tokens": EVERY_2_STEPS})
    run_ranks(_train, world_size=2, args=(reference,))  # synchronous saves, never interrupted
    run = dataclasses.replace(reference, run_dir=str(tmp_path / "run"),
                              checkpoint=dataclasses.replace(reference.checkpoint, async_save=True))
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    checkpoints = tmp_path / "run" / "checkpoints"

    # 1: kill -9 (every process) while step 4's background save is under way; step 2's is published.
    proc = _launch(run_yaml, MEGAMOBI_TEST_SAVE_DELAY_S="3")
    wait_for(proc, lambda: latest_name(checkpoints) == "step_0000002" and (checkpoints / ".step_0000004.partial").exists())
    for pid in [proc.pid, *descendants(proc.pid)]:  # the ranks too: they run in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert latest_name(checkpoints) == "step_0000002" and verify_checkpoint(checkpoints / "step_0000002") == []
    assert not (checkpoints / "step_0000004").exists()

    # 2: SIGTERM: the save it triggers runs in the background, and the run exits 75 only once it is published.
    proc = _launch(run_yaml, MEGAMOBI_TEST_SAVE_DELAY_S="2")
    # Not metrics.jsonl's steps: the killed attempt may have logged step 5 before this one truncates them.
    wait_for(proc, lambda: latest_name(checkpoints) == "step_0000004")
    os.killpg(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == STOPPED_AFTER_SAVE, output[-3000:]
    stopped_at = latest_name(checkpoints)
    assert stopped_at is not None and int(stopped_at.split("_")[1]) >= 5, output[-2000:]
    assert verify_checkpoint(checkpoints / stopped_at) == []
    assert not list(checkpoints.glob(".step_*.partial"))

    # 3: the same command once more, to the end.
    proc = _launch(run_yaml)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]

    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "reference")
    final = f"step_{STEPS:07d}"
    for kind in ("model", "optimizer"):
        expected = read_full_tensors(tmp_path / "reference" / "checkpoints" / final, kind)
        got = read_full_tensors(checkpoints / final, kind)
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), kind
    # Every checksum in the manifest was computed while writing; it is the sha256 of the file on disk.
    manifest = read_manifest(checkpoints / final)
    assert any(name.startswith("deepspeed/") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        assert sha256_file(checkpoints / final / name) == entry["sha256"], name


@contextmanager
def _small_disk(path: Path, *, size: str):
    """A real, full-able file system (tmpfs) mounted at `path`."""
    path.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)])


def _train_and_report(rank, run):
    trainer = Trainer(run)
    try:
        trainer.train()
    except RuntimeError as err:
        return str(err)
    return None


def test_failed_background_save_is_reported_and_never_published(tmp_path, token_shards):
    run = make_run(tmp_path / "run", token_shards, train={"steps": 4, "seed": 11, "log_interval": 1},
                   checkpoint={"interval_tokens": EVERY_2_STEPS, "async": True})
    run_ranks(_train, world_size=2, args=(dataclasses.replace(run, run_dir=str(tmp_path / "probe")),))
    size = sum(p.stat().st_size for p in (tmp_path / "probe" / "checkpoints" / "step_0000002").rglob("*") if p.is_file())
    with _small_disk(tmp_path / "run" / "checkpoints", size=f"{int(size * 1.5)}") as checkpoints:
        errors = run_ranks(_train_and_report, world_size=2, args=(run,))
        # Step 2's checkpoint fits; step 4's does not: reported, not published, latest unchanged.
        assert latest_name(checkpoints) == "step_0000002" and verify_checkpoint(checkpoints / "step_0000002") == []
        assert not (checkpoints / "step_0000004").exists() and not list(checkpoints.glob(".step_*.partial"))
        assert any(e and "checkpoint step_0000004 NOT saved" in e and "disk full writing" in e for e in errors), errors


def _verify_shared(rank, checkpoint):
    from megamobi.training.checkpoint import verify_checkpoint_across_ranks

    return verify_checkpoint_across_ranks(Path(checkpoint))


def test_resume_verification_is_shared_out_and_gathered(tmp_path):
    """Each rank hashes about half the bytes; every rank gets every rank's findings."""
    from megamobi.checkpointing.manifest import files_of_rank, write_manifest
    from megamobi.model_config import ModelConfig

    sizes = {"a.bin": 9000, "b/c.bin": 7000, "d.bin": 3000, "e.json": 100, "f.bin": 5000}
    for name, size in sizes.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(os.urandom(size))
    config = ModelConfig(name="t", vocab_size=64, hidden_size=8, num_layers=1, num_attention_heads=2,
                         intermediate_size=8, max_seq_len=8)
    files = write_manifest(tmp_path, model_config=config, info={"step": 1})["files"]
    shares = [files_of_rank(files, rank=r, world=2) for r in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(sizes) and not set(shares[0]) & set(shares[1])
    assert sorted(sum(sizes[n] for n in share) for share in shares) == [12000, 12100]  # balanced by bytes
    damaged = shares[1][0]  # a file only rank 1 checks
    data = bytearray((tmp_path / damaged).read_bytes())
    data[7] ^= 1
    (tmp_path / damaged).write_bytes(bytes(data))
    found = run_ranks(_verify_shared, world_size=2, args=(str(tmp_path),))
    assert found[0] == found[1] == [f"{tmp_path / damaged}: sha256 differs from the manifest"]
