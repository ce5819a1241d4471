"""preprocess_amber.py without --format: raw text is recognised (or the missing flag is named), never
reported as "missing field 'token_ids'"; every manifest records the largest token id."""
import json

import numpy as np
from data_helpers import amber_rows, run_tool, shard_file, write_amber, write_lines


def _text_lines(docs):
    return [json.dumps({"text": doc}) for doc in docs]


def test_text_jsonl_without_format_or_tokenizer_names_the_missing_flag(tmp_path, docs):
    path = write_lines(tmp_path / "docs.jsonl", ["", *_text_lines(docs[:20])])
    r = run_tool("preprocess_amber.py", "--input", path, "--output", tmp_path / "out", "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "lines have a 'text' field" in r.stderr and "--format text --tokenizer" in r.stderr
    assert "token_ids" not in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    plain = tmp_path / "book.txt"
    plain.write_text("\n".join(docs[:5]))
    r = run_tool("preprocess_amber.py", "--input", plain, "--output", tmp_path / "out2", "--no-progress")
    assert r.returncode == 2 and "is a plain-text file" in r.stderr and "--format text --tokenizer" in r.stderr


def test_text_with_a_tokenizer_is_read_as_text(tmp_path, docs, tokenizer_path):
    path = write_lines(tmp_path / "docs.jsonl", _text_lines(docs))
    r = run_tool("preprocess_amber.py", "--input", path, "--tokenizer", tokenizer_path, "--output", tmp_path / "inferred",
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "--format text (" in r.stderr
    r = run_tool("preprocess_amber.py", "--input", path, "--tokenizer", tokenizer_path, "--output", tmp_path / "explicit",
                 "--format", "text", "--no-progress")
    assert r.returncode == 0, r.stderr
    inferred = json.loads((tmp_path / "inferred" / "manifest.json").read_text())
    explicit = json.loads((tmp_path / "explicit" / "manifest.json").read_text())
    assert inferred["input_format"] == "text" and inferred["shards"] == explicit["shards"]
    tokens = np.fromfile(shard_file(tmp_path / "inferred", 0, "bin"), dtype=np.uint16)
    assert inferred["max_token_id"] == int(tokens.max()) < 700


def test_explicit_amber_on_text_says_which_flag(tmp_path, docs):
    path = write_lines(tmp_path / "docs.jsonl", _text_lines(docs[:3]))
    r = run_tool("preprocess_amber.py", "--format", "amber", "--input", path, "--output", tmp_path / "out", "--no-progress")
    assert r.returncode == 1 and "missing field 'token_ids' (the line has a 'text' field: raw text needs --format text" in r.stderr


def test_amber_manifest_records_the_largest_id(tmp_path):
    rows = amber_rows(5)
    rows[3]["token_ids"][100] = 31999
    path = write_amber(tmp_path / "in.jsonl", rows)
    r = run_tool("preprocess_amber.py", "--input", path, "--output", tmp_path / "out", "--samples-per-shard", 2,
                 "--no-progress")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_format"] == "amber" and manifest["max_token_id"] == 31999
    assert [s["max_token_id"] for s in manifest["shards"]] == [
        max(max(r["token_ids"]) for r in rows[i:i + 2]) for i in (0, 2, 4)]
