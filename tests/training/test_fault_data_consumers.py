"""Issue 17 cases 8 and 11 through the real command lines.

Case 8: a shard's bytes changed in place (same size) between a stop and its resume are refused like any
other data change (exit 2, one line naming the shard), accepted and recorded with data.allow_change;
`--verify-shards` catches a change between the sampled blocks; a checkpoint without fingerprints says
that content cannot be checked.
Case 11: `megamobi.evaluate` and `megamobi.generate` refuse a checkpoint whose weights fail the
manifest's checksums (exit 2, one line with the `--verify` advice) where they printed a loss / text
before. (The eval sweep's skip of a broken checkpoint: tests/eval/test_eval.py; convert's refusal:
tests/convert/test_convert_cli.py; all three go through megamobi/checkpointing/verified.py.)
"""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multiproc import free_port
from run_yaml import write_run_yaml
from training_runs import VOCAB, make_run, read_metrics

from megamobi.checkpointing.manifest import read_manifest
from megamobi.data.fingerprints import BLOCK_BYTES, BLOCKS

STEP2, STEP4 = "step_0000002", "step_0000004"


def _cli(repo_root, *argv, env=None):
    return subprocess.run([sys.executable, "-m", *argv], cwd=repo_root, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _pretrain(repo_root, config, *args, start=False, env=None):
    """`python -m megamobi.pretrain` as one rank would run it (`start`: a real start, not --check-only)."""
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return _cli(repo_root, "megamobi.pretrain", "--config", str(config), *args,
                env={"WORLD_SIZE": "1", **(ranks if start else {}), **(env or {})})


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _bump_tokens(path: Path, *, offset: int, count: int) -> None:
    """Rewrite `count` token ids from byte `offset` in place (still ids the model knows): same size."""
    tokens = np.fromfile(path, dtype=np.uint16)
    first = offset // 2
    tokens[first:first + count] = (tokens[first:first + count].astype(np.int64) + 1) % VOCAB
    with open(path, "r+b") as stream:  # in place: same file, same size
        stream.write(tokens.tobytes())


def _unsampled_offset(size: int) -> int:
    """An even byte offset that none of the fingerprint's sampled blocks covers."""
    starts = [i * (size - BLOCK_BYTES) // (BLOCKS - 1) for i in range(BLOCKS)]
    offset = next(x for x in range(0, size, 2) if not any(s <= x < s + BLOCK_BYTES for s in starts))
    assert not any(s <= offset + 1 < s + BLOCK_BYTES for s in starts)
    return offset


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, token_shards):
    """A 4-step run on its own copy of the shards, a checkpoint every 2 steps, killed at step 3 through
    MEGAMOBI_FAULTS: step_0000002 is its newest checkpoint."""
    repo_root = Path(__file__).resolve().parents[2]
    root = tmp_path_factory.mktemp("i17data")
    shards = root / "shards"
    shutil.copytree(token_shards, shards)
    run = make_run(root / "run", shards, train={"steps": 4, "seed": 11, "log_interval": 1},
                   checkpoint={"interval_tokens": 512})
    config = write_run_yaml(root / "run.yaml", run)
    proc = _pretrain(repo_root, config, start=True, env={"MEGAMOBI_FAULTS": "kill:step=3:rank=0"})
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL at step 3, after step 2's save
    assert (root / "run" / "checkpoints" / STEP2 / "megamobi.json").is_file()
    return root, shards, config


def test_a_shard_changed_in_place_is_refused_unless_allowed_and_verify_shards_sees_every_byte(stopped_run, repo_root):
    root, shards, config = stopped_run
    run_dir = root / "run"
    manifest = json.loads((shards / "manifest.json").read_text())
    files = [info["file"] for record in manifest["shards"] for info in record["files"].values()]
    recorded = read_manifest(run_dir / "checkpoints" / STEP2)["data_fingerprints"]
    assert recorded["scheme"] == {"blocks": BLOCKS, "block_bytes": BLOCK_BYTES}
    assert sorted(recorded["paths"][str(shards)]) == sorted(files)  # every .bin, .idx and .src.npy
    shard = shards / manifest["shards"][0]["files"]["bin"]["file"]
    original, size = shard.read_bytes(), shard.stat().st_size
    assert size > BLOCKS * BLOCK_BYTES  # sampled, not hashed whole

    # Bytes in the middle rewritten, size kept: --check-only and a real start both stop, naming the shard.
    _bump_tokens(shard, offset=size // 2, count=8)
    assert shard.stat().st_size == size
    for args, start in (("--check-only",), False), ((), True):
        proc = _pretrain(repo_root, config, *args, start=start)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert f"{shard}: same size ({size:,} bytes) but other bytes in its sampled blocks (changed in place)" in line
        assert STEP2 in line and "data.allow_change: true" in line
    assert not (run_dir / "checkpoints" / STEP4).exists()

    # A change between the sampled blocks: invisible to the fingerprints, caught by --verify-shards.
    shard.write_bytes(original)
    proc = _pretrain(repo_root, config, "--check-only", "--verify-shards")
    assert proc.returncode == 0 and "megamobi: --verify-shards: 3 shards match their manifest.json sha256" in proc.stdout
    _bump_tokens(shard, offset=_unsampled_offset(size), count=1)
    assert _pretrain(repo_root, config, "--check-only").returncode == 0
    proc = _pretrain(repo_root, config, "--check-only", "--verify-shards")
    assert proc.returncode == 2
    assert f"--verify-shards: {shard}: sha256 differs from manifest" in _one_error_line(proc)

    # data.allow_change: the resume goes on, and the override is in the log, metrics.jsonl and the manifest.
    _bump_tokens(shard, offset=size // 2, count=8)
    proc = _pretrain(repo_root, config, "data.allow_change=true", start=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    change = f"{shard}: same size ({size:,} bytes) but other bytes in its sampled blocks (changed in place)"
    assert f"data.allow_change is true: continuing at step 2 with changed data: {change}" in proc.stdout + proc.stderr
    [record] = [m for m in read_metrics(run_dir) if "data_change" in m]
    assert record == {"step": 2, "data_change": [change], "data_allow_change": True}
    final = read_manifest(run_dir / "checkpoints" / STEP4)
    assert [s["data_changed"] for s in final["data_provenance"]] == [[], [change]]
    assert final["data_fingerprints"]["paths"][str(shards)] != recorded["paths"][str(shards)]  # the new bytes

    # A checkpoint from before fingerprints (none recorded): resumable, with one line saying so.
    newest = run_dir / "checkpoints" / STEP4 / "megamobi.json"
    older = json.loads(newest.read_text())
    del older["data_fingerprints"]
    newest.write_text(json.dumps(older))
    proc = _pretrain(repo_root, config, "--check-only")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"on resume: {run_dir / 'checkpoints' / STEP4} records no shard fingerprints (written by an older "
            "megamobi): the shards' content cannot be checked") in proc.stdout


def _tokenizer(path: Path) -> Path:
    import sentencepiece as spm

    text = [f"The quick brown fox {i} jumps over the lazy dog. Its color is red, blue, green or white; "
            f"said the owl, cat, bee, cow, pig and hen on day {i * 7}." for i in range(300)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=320, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2)
    path.write_bytes(buffer.getvalue())
    return path


def test_evaluate_and_generate_refuse_a_checkpoint_that_fails_its_checksums(stopped_run, token_shards, repo_root,
                                                                            tmp_path):
    root, _, _ = stopped_run
    checkpoint = tmp_path / "run" / "checkpoints" / STEP2
    shutil.copytree(root / "run" / "checkpoints" / STEP2, checkpoint)
    tokenizer = _tokenizer(tmp_path / "tokenizer.model")
    evaluate = ("megamobi.evaluate", "--checkpoint", str(checkpoint), "--data", str(token_shards), "--samples", "1",
                "--device", "cpu")
    generate = ("megamobi.generate", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
                "--max-new-tokens", "4")
    proc = _cli(repo_root, *evaluate)
    assert proc.returncode == 0 and f"{checkpoint}: loss " in proc.stdout, proc.stderr[-3000:]
    assert _cli(repo_root, *generate).returncode == 0

    weights = next((checkpoint / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))
    for argv in (evaluate, generate):
        proc = _cli(repo_root, *argv)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stdout == ""  # no loss, no text
        line = _one_error_line(proc)
        assert line.startswith(f"error: {checkpoint}: broken or incomplete checkpoint, refusing to ")
        assert f"{weights}: sha256 differs from the manifest" in line
        assert f"run `python -m megamobi.checkpoints {tmp_path.resolve() / 'run'} --verify`" in line


def test_verify_shards_is_a_flag(capsys):
    from megamobi.pretrain import parse_args

    assert parse_args(["--config", "run.yaml", "--verify-shards"]).verify_shards
    assert not parse_args(["--config", "run.yaml"]).verify_shards
    with pytest.raises(SystemExit) as exc:
        parse_args(["--config", "run.yaml", "--verify-shards=yes"])
    assert exc.value.code == 2 and "--verify-shards: ignored explicit argument 'yes'" in capsys.readouterr().err
