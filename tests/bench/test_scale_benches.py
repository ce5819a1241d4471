"""bench/scale_checkpoint.py and bench/scale_preprocess.py at toy size: every row is measured against
its anchor in the same run (what they report, not how fast: figures only)."""

import math

import yaml
from multiproc import run_ranks

TINY = {"name": "bench-tiny", "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 48, "max_seq_len": 64, "ffn_sharing": "shared"}


def _checkpoint_rows(rank, model_yaml, workdir):
    import scale_checkpoint

    figures = scale_checkpoint.measure(model=model_yaml, workdir=workdir, with_async=True)
    return figures, scale_checkpoint.rows(figures)


def _check(table, goals):
    assert [row["goal"] for row in table] == goals
    for row in table:
        assert math.isfinite(row["measured"]) and row["measured"] > 0, row
        if row["goal"] != "info":
            assert row["ratio"] > 0 and isinstance(row["met"], bool), row


def test_checkpoint_bench_rows(tmp_path):
    model = tmp_path / "tiny.yaml"
    model.write_text(yaml.safe_dump(TINY))
    figures, table = run_ranks(_checkpoint_rows, world_size=1, args=(str(model), tmp_path))[0]
    _check(table, [">= 0.8", ">= 0.8", "info", "<= 0.1"])
    assert figures["checkpoint_bytes"] > 0 and figures["dd_write_Bps"] > 0 and figures["dd_read_Bps"] > 0
    assert table[0]["ratio"] == figures["save_Bps"] / figures["dd_write_Bps"]


def test_preprocess_bench_rows(tmp_path):
    import scale_preprocess

    table = scale_preprocess.rows(lines=40, workers=2, workdir=tmp_path, repeats=1)
    _check(table, [">= 0.9", ">= 0.9", "<= 0.05"])
    assert "orjson" in table[0]["anchor"] or "msgspec" in table[0]["anchor"]
