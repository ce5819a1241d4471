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


def test_scale_driver_blend_and_replay_rows(tmp_path, capsys):
    import pytest
    import scale

    out = scale.run(sections=["blend", "replay"], quick=True, workdir=tmp_path)
    _check([r for r in out["blend"] if r["goal"] != "info"], ["<= 1 GiB", "<= 10 s", "<= 10 s", "<= 1 GiB"])
    assert [r["goal"] for r in out["replay"]] == ["<= 1 s"] * 4 + [">= 10x"]
    legacy = out["blend_figures"]["legacy"]
    assert [e["tokens"] for e in legacy] == [2e8, 1e9] and abs(legacy[1]["samples"] - 5 * legacy[0]["samples"]) <= 5
    assert all(e["peak_above_import"] > 0 and e["seconds"] > 0 for e in legacy)
    replay = out["replay_figures"]
    assert replay["steps_tokens"] == 64 * 2049 and replay["legacy_steps_s"] > 0
    printed = capsys.readouterr().out
    assert "== blend" in printed and "== replay" in printed and "load average" in printed
    for bad in ("", "blend,nope"):
        with pytest.raises(SystemExit) as exit_info:
            scale.main(["--section", bad])
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        scale.main(["--workdir", str(tmp_path / "missing")])
    assert exit_info.value.code == 2
