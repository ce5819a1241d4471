"""inspect_shards.py's advice for a damaged shard is what actually repairs it: a plain re-run keeps a
shard whose bytes changed (sizes and headers still match), `--verify-existing` rebuilds it."""

from data_helpers import amber_rows, run_tool, shard_file, shard_files, write_amber


def test_the_advised_command_rebuilds_a_damaged_shard(tmp_path):
    out = tmp_path / "out"
    files = [write_amber(tmp_path / f"in{k}.jsonl", amber_rows(6, seed=k)) for k in range(2)]
    args = ["--input", *files, "--output", out, "--samples-per-shard", 4, "--no-progress"]
    assert run_tool("preprocess_amber.py", *args).returncode == 0
    expected = shard_files(out)
    damaged = shard_file(out, 1, "bin")
    data = bytearray(damaged.read_bytes())
    data[100] ^= 1
    damaged.write_bytes(bytes(data))

    r = run_tool("inspect_shards.py", out)
    assert r.returncode == 1 and damaged.stem in r.stderr and "--verify-existing" in r.stderr, r.stderr
    assert run_tool("preprocess_amber.py", *args).returncode == 0  # the same arguments alone ...
    assert run_tool("inspect_shards.py", out).returncode == 1       # ... keep the damaged shard
    assert run_tool("preprocess_amber.py", *args, "--verify-existing").returncode == 0
    assert run_tool("inspect_shards.py", out).returncode == 0 and shard_files(out) == expected
