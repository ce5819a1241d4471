"""bench/throughput.py on a 2-layer model: what it builds and reports (not how fast: figures only)."""

import json

import pytest
import throughput
import torch
import yaml
from multiproc import run_ranks

from megamobi.model import MobiLlama, flops_per_token, parameter_counts
from megamobi.model_config import load_model_config

MICRO = {"name": "micro", "vocab_size": 96, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 48, "ffn_sharing": "shared", "max_seq_len": 32}


@pytest.fixture
def micro_yaml(tmp_path):
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(MICRO))
    return path


def test_hf_llama_has_megamobis_shape_and_one_shared_mlp(micro_yaml):
    config = load_model_config(micro_yaml)
    hf = throughput.hf_llama(config)
    assert len({id(layer.mlp) for layer in hf.model.layers}) == 1
    assert hf.config._attn_implementation == "sdpa"
    # Same parameters, counted once each: the shared MLP is one module in both.
    assert sum(p.numel() for p in hf.parameters()) == parameter_counts(config)["params_unique"]
    assert sum(p.numel() for p in MobiLlama(config).parameters()) == parameter_counts(config)["params_unique"]


def test_megamobi_against_hf_report(micro_yaml, capsys):
    args = ["--config", str(micro_yaml), "--seq", "16", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
            "--peak-tflops", "1.0", "--json"]
    assert throughput.main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours, theirs = report["results"]["megamobi"], report["results"]["hf-llama"]
    assert report["flops_per_token"] == flops_per_token(load_model_config(micro_yaml), seq_len=16)
    for r in (ours, theirs):
        assert r["steps"] == 2 and r["tokens_per_s"] == pytest.approx(2 * 16 / (r["ms_per_step"] / 1e3))
        assert r["tflops"] == pytest.approx(report["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert r["mfu"] == pytest.approx(r["tflops"] / 1.0) and r["memory_gb"] is None  # no CUDA here
    assert report["ratio"] == pytest.approx(ours["tokens_per_s"] / theirs["tokens_per_s"])
    # On CPU also by process CPU time per step (robust to other jobs on the machine), in the same sense.
    assert ours["cpu_ms_per_step"] > 0 and theirs["cpu_ms_per_step"] > 0
    assert report["cpu_time_ratio"] == pytest.approx(theirs["cpu_ms_per_step"] / ours["cpu_ms_per_step"])
    assert "loss chunked-linear-cross-entropy" in report["kernels"] and report["dtype"] == "fp32"
    # The table prints the same figures, the ratio last.
    assert throughput.table(report).splitlines()[-1].startswith("  ratio megamobi / hf-llama tokens/s:")


def test_compiled_and_selective_variants_run(micro_yaml):
    args = throughput.parse_args(["--config", str(micro_yaml), "--seq", "16", "--micro-batch", "1", "--steps", "1",
                                  "--warmup", "1", "--compile", "--compile-backend", "aot_eager",
                                  "--activation-checkpointing", "selective", "--kernels", "plain"])
    report = throughput.run_benchmark(args)
    assert report["compile_backend"] == "aot_eager" and "torch.compile (aot_eager)" in report["kernels"]
    assert "loss full-logits (train.kernels: plain)" in report["kernels"]


def _trainer_report(rank, micro_yaml):
    args = throughput.parse_args(["--config", str(micro_yaml), "--seq", "16", "--micro-batch", "2", "--steps", "2",
                                  "--warmup", "1", "--trainer"])
    return throughput.run_benchmark(args)


def test_trainer_mode_times_the_real_trainer(micro_yaml):
    report = run_ranks(_trainer_report, world_size=1, args=(micro_yaml,))[0]
    trainer, plain = report["results"]["trainer"], report["results"]["plain"]
    assert report["mode"] == "trainer-vs-plain" and trainer["steps"] == 2 and plain["steps"] == 4  # before + after
    assert report["ratio"] == pytest.approx(trainer["tokens_per_s"] / plain["tokens_per_s"])
    assert report["cpu_time_ratio"] == pytest.approx(plain["cpu_ms_per_step"] / trainer["cpu_ms_per_step"])
    assert report["kernels"].startswith("kernels (auto)")


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch", "0"], "argument --micro-batch: must be a positive integer, got 0"),
    (["--steps", "-2"], "argument --steps: must be a positive integer, got -2"),
    (["--peak-tflops", "0"], "argument --peak-tflops: must be positive, got 0"),
    (["--kernels", "fast"], "argument --kernels: invalid choice: 'fast'"),
    (["--seq", "64"], "--seq 64 is longer than micro's max_seq_len 32"),
    (["--seq", "24", "--trainer"], "--trainer needs a --seq that divides 2048"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--seq", "0"], ""),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, micro_yaml, capsys):
    try:
        code = throughput.main(["--config", str(micro_yaml), *argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("throughput.py: error: ") and message in err, err


def test_missing_config_is_named(tmp_path, capsys):
    assert throughput.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.yaml" in err and "not found" in err
