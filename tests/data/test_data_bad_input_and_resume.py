"""Bad input stops the run (file:line, reason, exit 1, nothing half-written) or is skipped and
listed; interrupted runs resume to byte-identical output."""
import json

import pytest
from data_helpers import amber_rows, run_tool, shard_file, shard_files, write_amber, write_lines

GOOD = json.dumps(amber_rows(1)[0])
_row = amber_rows(1)[0]
BAD_LINES = {
    "bad_json": ('{"token_ids": [1, 2', "invalid JSON"),
    "missing_field": (json.dumps({"source": "c4"}), "missing field 'token_ids'"),
    "wrong_length": (json.dumps({"token_ids": [1] * 2048, "source": "c4"}), "2048 entries"),
    "out_of_range": (json.dumps({"token_ids": [32000] + [1] * 2048, "source": "c4"}), "token id 32000"),
    "negative": (json.dumps({"token_ids": [-1] + [1] * 2048, "source": "c4"}), "token id -1"),
    "non_integer": (json.dumps({"token_ids": [1.5] + [1] * 2048, "source": "c4"}), "non-integer"),
    "boolean": (json.dumps({"token_ids": [True] + [1] * 2048, "source": "c4"}), "non-integer"),
    "string_id": (json.dumps({"token_ids": ["7"] + [1] * 2048, "source": "c4"}), "non-integer"),
    "bad_utf8": (b'{"token_ids": [], "source": "\xff\xfe"}', "undecodable UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_stops_with_file_and_line(tmp_path, case):
    bad, message = BAD_LINES[case]
    path = write_lines(tmp_path / "in.jsonl", [GOOD, GOOD, GOOD, bad, GOOD])
    out = tmp_path / "out"
    r = run_tool("preprocess_amber.py", "--input", path, "--output", out, "--samples-per-shard", 2,
                 "--no-progress")
    assert r.returncode == 1
    assert f"{path.resolve()}:4:" in r.stderr and message in r.stderr, r.stderr
    assert "--skip-bad" in r.stderr
    # The chunk is refused as a whole before any of it lands in a shard: no shard, no manifest.
    assert not list(out.glob("shard_*"))
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()


def test_bad_line_number_in_later_chunk(tmp_path):
    lines = [GOOD] * 9 + ['{"oops"'] + [GOOD] * 3
    path = write_lines(tmp_path / "in.jsonl", lines)
    r = run_tool("preprocess_amber.py", "--input", path, "--output", tmp_path / "out",
                 "--chunk-mb", 0.02, "--workers", 2, "--no-progress")
    assert r.returncode == 1 and f"{path.resolve()}:10:" in r.stderr, r.stderr


def test_skip_bad_counts_and_lists(tmp_path):
    lines = [GOOD, BAD_LINES["bad_json"][0], GOOD, BAD_LINES["out_of_range"][0], "", GOOD,
             BAD_LINES["out_of_range"][0]]
    path = write_lines(tmp_path / "in.jsonl", lines)
    r = run_tool("preprocess_amber.py", "--input", path, "--output", tmp_path / "out", "--skip-bad",
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_samples"] == 3
    assert m["stats"]["bad_lines_by_reason"] == {"bad_json": 1, "out_of_range": 2}
    assert [(b["line"], b["reason"]) for b in m["bad_lines"]] == [(2, "bad_json"), (4, "out_of_range"),
                                                                 (7, "out_of_range")]
    assert m["stats"]["blank_lines"] == 1


def test_text_bad_utf8_and_missing_text(tmp_path, tokenizer_path):
    path = write_lines(tmp_path / "t.jsonl", ['{"text": "fine"}', '{"txt": "no"}'])
    r = run_tool("preprocess_amber.py", "--format", "text", "--tokenizer", tokenizer_path,
                 "--input", path, "--output", tmp_path / "o", "--no-progress")
    assert r.returncode == 1 and ":2:" in r.stderr and "missing field 'text'" in r.stderr
    plain = write_lines(tmp_path / "p.txt", [b"ok", b"bad \xff byte"])
    r = run_tool("preprocess_amber.py", "--format", "text", "--tokenizer", tokenizer_path,
                 "--input", plain, "--output", tmp_path / "o2", "--no-progress")
    assert r.returncode == 1 and "p.txt:2:" in r.stderr and "UTF-8" in r.stderr


def _build(tmp_path, out, *extra):
    files = [write_amber(tmp_path / f"in{k}.jsonl", amber_rows(9, seed=k)) for k in range(3)]
    args = ["--input", *files, "--output", out, "--samples-per-shard", 4, "--chunk-mb", 0.03,
            "--no-progress", *extra]
    r = run_tool("preprocess_amber.py", *args)
    assert r.returncode == 0, r.stderr
    return args


def test_resume_rebuilds_only_what_is_missing(tmp_path):
    reference = tmp_path / "ref"
    _build(tmp_path, reference)
    expected = shard_files(reference)
    out = tmp_path / "out"
    args = _build(tmp_path, out)
    first, third, fourth = (shard_file(out, k) for k in (1, 3, 4))
    # Simulate a crash: manifest gone, the progress log's last line torn, shard 3 deleted, a .tmp left.
    (out / "manifest.json").unlink()
    log = (out / ".progress.jsonl").read_text().splitlines()
    (out / ".progress.jsonl").write_text("\n".join(log[:-1]) + "\n" + log[-1][:20])
    third.unlink()
    fourth.with_name(fourth.name + ".tmp").write_bytes(b"partial")
    kept = first.stat().st_mtime_ns
    r = run_tool("preprocess_amber.py", *args)
    assert r.returncode == 0, r.stderr
    assert shard_files(out) == expected
    assert first.stat().st_mtime_ns == kept  # valid shards are not rewritten
    assert not list(out.glob("*.tmp"))
    r = run_tool("preprocess_amber.py", *args)  # complete: nothing to do
    assert r.returncode == 0 and first.stat().st_mtime_ns == kept


def test_truncated_shard_is_rebuilt_and_changed_inputs_refused(tmp_path):
    out = tmp_path / "out"
    args = _build(tmp_path, out)
    expected = shard_files(out)
    with open(shard_file(out, 2, "bin"), "r+b") as f:
        f.truncate(100)
    assert run_tool("preprocess_amber.py", *args).returncode == 0
    assert shard_files(out) == expected
    write_amber(tmp_path / "in0.jsonl", amber_rows(5))  # inputs changed under the output
    r = run_tool("preprocess_amber.py", *args)
    assert r.returncode == 1 and "--overwrite" in r.stderr


def test_inspect_shards_verifies_and_shows(tmp_path, tokenizer_path, sp):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"text": "hello there " * 800})])
    out = tmp_path / "out"
    assert run_tool("preprocess_amber.py", "--format", "text", "--tokenizer", tokenizer_path,
                    "--input", path, "--output", out, "--no-progress").returncode == 0
    r = run_tool("inspect_shards.py", out, "--tokenizer", tokenizer_path, "--show", 0)
    assert r.returncode == 0 and "all shards verified" in r.stdout and "hello there" in r.stdout
    assert "t " in r.stdout  # per-source totals, source = file stem "t"
    data = bytearray(shard_file(out, 0, "bin").read_bytes())
    data[10] ^= 1
    shard_file(out, 0, "bin").write_bytes(bytes(data))
    r = run_tool("inspect_shards.py", out)
    assert r.returncode == 1 and "sha256" in r.stderr


def test_train_tokenizer_script(tmp_path, docs):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps({"text": d}) for d in docs[:200]])
    r = run_tool("train_tokenizer.py", "--input", corpus, "--output", tmp_path / "tk", "--vocab-size", 600)
    assert r.returncode == 0, r.stderr
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tk.model"))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.vocab_size()) == (0, 1, 2, 600)
    assert sp.decode(sp.encode("héllo ∑ wörld")) == "héllo ∑ wörld"  # byte fallback
    r = run_tool("train_tokenizer.py", "--input", corpus, "--output", tmp_path / "t2", "--vocab-size", 100)
    assert r.returncode == 1 and "--vocab-size" in r.stderr


def test_kill_9_mid_run_then_rerun_gives_the_same_shards(tmp_path):
    """A real crash: SIGKILL the preprocessor (and its workers) while shards are being written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from data_helpers import REPO_ROOT

    source = write_amber(tmp_path / "train_000.jsonl", amber_rows(1200, seed=3))
    args = ["--input", str(source), "--samples-per-shard", "20", "--workers", "2", "--chunk-mb", "0.5", "--no-progress"]
    reference = tmp_path / "ref"
    assert run_tool("preprocess_amber.py", *args, "--output", str(reference)).returncode == 0
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "data_tools/preprocess_amber.py", *args, "--output", str(out)],
                            cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("shard_*.bin"))) < 3:
        assert proc.poll() is None, "finished before it could be killed: make the input larger"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the workers too
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("shard_*.bin"))) < len(list(reference.glob("shard_*.bin")))
    r = run_tool("preprocess_amber.py", *args, "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert shard_files(out) == shard_files(reference)
    assert not list(out.glob("*.tmp"))


def test_fast_amber_parser_agrees_with_the_reference_parser():
    """The msgspec fast path accepts exactly what the strict parser accepts, with the same tokens,
    and every refusal carries the strict parser's reason and message."""
    from megamobi.data.line_parsers import AmberLineParser, LineRejected, parse_amber_line

    ids = [1] * 2048
    lines = [GOOD.encode(), *(b if isinstance(b, bytes) else b.encode() for b, _ in BAD_LINES.values())]
    lines += [json.dumps(obj).encode() for obj in (
        {"token_ids": [31999] + ids, "source": "c4", "extra": [1, {"x": None}]},  # unknown fields ignored
        {"token_ids": [1.0] + ids, "source": "c4"}, {"token_ids": [2 ** 70] + ids, "source": "c4"},
        {"token_ids": [65536] + ids, "source": "c4"}, {"token_ids": [0] + ids, "source": ""},
        {"token_ids": [0] + ids, "source": 7}, {"token_ids": "abc", "source": "c4"}, [1, 2])]
    lines += [b'{"token_ids": [0' + b", 1" * 2048 + b'], "source": "c4", "x": "\xff"}',  # bad UTF-8, skipped field
              b'  {"source": "w\xc3\xa9", "token_ids":[0' + b",1" * 2048 + b"]}  \n"]

    def outcome(parse, raw):
        try:
            tokens, source = parse(raw)
            return tokens.dtype.name, tokens.tolist(), source
        except LineRejected as err:
            return err.reason, err.detail

    fast = AmberLineParser(vocab_size=32000)
    for raw in lines:
        assert outcome(fast, raw) == outcome(lambda r: parse_amber_line(r, vocab_size=32000), raw), raw[:80]
