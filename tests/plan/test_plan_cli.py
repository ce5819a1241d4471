"""`python -m megamobi.plan`: bad arguments, --json, the paper's layout, agreement with the Trainer's
validation, and --for-run against a real run's metrics.jsonl."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from multiproc import run_ranks
from run_yaml import write_run_yaml

from megamobi.config_io import from_dict
from megamobi.plan.__main__ import main
from megamobi.plan.layouts import Layout, with_layout
from megamobi.training.run_config import RunConfig, load_run_config

PAPER_CONFIG = str(Path(__file__).resolve().parents[2] / "configs/pretrain-mobillama-0.5b.yaml")
CLUSTER = ["--nodes", "20", "--gpus-per-node", "8", "--gpu", "a100-80gb"]
CANDIDATE_KEYS = {"own", "overrides", "tensor", "pipeline", "data", "micro_batch", "zero_stage",
                  "activation_checkpointing", "sequence_parallel", "fits", "memory_gb", "step_s", "tokens_per_s",
                  "tokens_per_s_per_gpu"}
MEMORY_KEYS = {"params", "grads", "optimizer", "activations", "other", "total"}


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def paper_json():
    """The JSON lines of the paper's own setting (its config's data is on a cluster, not here)."""
    result = subprocess.run([sys.executable, "-m", "megamobi.plan", "--config", PAPER_CONFIG, *CLUSTER, "--json"],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


BAD = [
    (["--nodes", "0"], "--nodes"), (["--nodes", "-2"], "--nodes"), (["--nodes", "two"], "--nodes"),
    (["--nodes", "1.5"], "--nodes"), (["--gpus-per-node", "0"], "--gpus-per-node"),
    (["--gpu", "a100"], "--gpu"), (["--gpu", "h200-141GB"], "--gpu"),
    (["--top", "0"], "--top"), (["--top", "-1"], "--top"), (["--top", "x"], "--top"),
    (["--peak-tflops", "0"], "--peak-tflops"), (["--peak-tflops", "-312"], "--peak-tflops"),
    (["--peak-tflops", "fast"], "--peak-tflops"), (["--peak-tflops", "inf"], "--peak-tflops"),
    (["--memory-gb", "0"], "--memory-gb"), (["--memory-gb", "nan"], "--memory-gb"),
    (["--intra-gbps", "-1"], "--intra-gbps"), (["--inter-gbps", "x"], "--inter-gbps"),
    (["--compute-fraction", "0"], "--compute-fraction"), (["--compute-fraction", "1.5"], "--compute-fraction"),
]


@pytest.mark.parametrize("change, argument", BAD, ids=[" ".join(c) for c, _ in BAD])
def test_bad_values_exit_2_with_one_line(change, argument, capsys):
    args = {"--config": PAPER_CONFIG, "--nodes": "20", "--gpus-per-node": "8", "--gpu": "a100-80gb"}
    args.update(dict(zip(change[::2], change[1::2])))
    code, out, err = _run([x for kv in args.items() for x in kv], capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert argument in err


def test_wrong_kind_of_path_exits_2_with_one_line(tmp_path, capsys):
    for argv, expected in (
        (["--config", str(tmp_path), *CLUSTER], "is a directory"),
        (["--config", str(tmp_path / "missing.yaml"), *CLUSTER], "no such file"),
        (["--config", PAPER_CONFIG, *CLUSTER, "--for-run", PAPER_CONFIG], "not a directory"),
        (["--config", PAPER_CONFIG, *CLUSTER, "--for-run", str(tmp_path)], "no metrics.jsonl"),
    ):
        code, _, err = _run(argv, capsys)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1, err
        assert expected in err, err


def test_a_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(PAPER_CONFIG).read().replace("micro_batch_size: 5", "micro_batch_size: -5"))
    code, _, err = _run(["--config", str(bad), *CLUSTER], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "micro_batch_size" in err, err


def test_json_has_exactly_the_documented_keys(paper_json):
    assert paper_json
    for candidate in paper_json:
        assert set(candidate) == CANDIDATE_KEYS
        assert set(candidate["memory_gb"]) == MEMORY_KEYS
        parts = sum(candidate["memory_gb"][k] for k in MEMORY_KEYS - {"total"})
        assert candidate["memory_gb"]["total"] == pytest.approx(parts, abs=0.01)
        assert candidate["tokens_per_s_per_gpu"] == pytest.approx(candidate["tokens_per_s"] / 160, rel=1e-3)
        assert candidate["tokens_per_s"] == pytest.approx(800 * 2048 / candidate["step_s"], rel=1e-3)
    # best first: every fitting candidate before any that does not fit, each group by tokens/s
    fits = [c["fits"] for c in paper_json]
    assert fits == sorted(fits, reverse=True)
    speeds = [c["tokens_per_s"] for c in paper_json if c["fits"]]
    assert speeds == sorted(speeds, reverse=True)


def test_the_papers_layout_appears_beside_the_papers_measurement(paper_json, capsys):
    paper = [c for c in paper_json if (c["tensor"], c["pipeline"], c["data"], c["micro_batch"], c["zero_stage"],
                                       c["activation_checkpointing"], c["sequence_parallel"]) ==
             (1, 1, 160, 5, 1, "none", False)]
    assert len(paper) == 1 and paper[0]["fits"]
    assert paper[0]["own"] and paper[0]["overrides"] == []  # the config's own layout, marked (issue 20 case 16)
    assert [c["own"] for c in paper_json].count(True) == 1
    # 0.5B on an 80 GB A100 with micro batch 5: far from full, and within a factor of two of the paper
    assert 10 < paper[0]["memory_gb"]["total"] < 60
    assert 7_000 < paper[0]["tokens_per_s_per_gpu"] < 30_000
    code, out, _ = _run(["--config", PAPER_CONFIG, *CLUSTER, "--top", "3"], capsys)
    assert code == 0
    assert "this config's layout" in out and "the paper measured 14,000-15,000" in out


def test_the_printed_overrides_train_exactly_each_ranked_layout(paper_json, capsys):
    """Issue 20 case 6: `plan` names the exact overrides of every layout it ranks, and they work on the
    paper's config, which names its model (model: mobillama-0.5b), model.activation_checkpointing too."""
    from megamobi.plan.layouts import own_layout

    chosen = {}  # one candidate per distinct set of changed keys, the checkpointing modes included
    for c in paper_json:
        chosen.setdefault(tuple(sorted(o.split("=")[0] for o in c["overrides"])) + (c["activation_checkpointing"],), c)
    assert {c["activation_checkpointing"] for c in chosen.values()} == {"none", "selective", "full"}
    for c in chosen.values():
        run = load_run_config(PAPER_CONFIG, c["overrides"], check_data=False)
        run.validate(world_size=160, check_data=False)
        assert own_layout(run, 160) == Layout(c["tensor"], c["pipeline"], c["data"], c["micro_batch"], c["zero_stage"],
                                              c["activation_checkpointing"], c["sequence_parallel"]), c["overrides"]
    _, out, _ = _run(["--config", PAPER_CONFIG, *CLUSTER, "--top", "3"], capsys)
    lines = out.splitlines()
    start = lines.index("overrides that train each layout above (append them to the pretrain / launch/pretrain.sh "
                        "command):")
    assert [line.split()[0] for line in lines[start + 1:start + 4]] == ["1", "2", "3"]
    assert lines[start + 1].split(None, 1)[1] == " ".join(paper_json[0]["overrides"])


def test_refusal_reasons_are_whole_words(capsys):
    from megamobi.plan.layouts import _reason_kind

    long = "parallel.sequence_parallel needs tensor > 1 and the sequence " + "length divisible " * 8 + "by T; more"
    cut = _reason_kind(long)
    assert cut.endswith(" ...") and len(cut) <= 114
    assert long.startswith(cut[:-4]) and long[len(cut) - 4] == " "  # cut between two words
    assert _reason_kind("short reason; detail") == "short reason"
    _, out, _ = _run(["--config", PAPER_CONFIG, *CLUSTER, "--top", "1"], capsys)
    reasons = out.split("refused by the Trainer's checks (count, reason):\n")[1].split("\n\n")[0].splitlines()
    assert reasons and all(len(r.split(None, 1)[1]) <= 110 or r.endswith(" ...") for r in reasons), reasons


def _layout_yaml(tmp_path: Path, tensor: int) -> str:
    """A run of the named 0.5B model that 6 GPUs can hold with T = 2 (global batch 12, micro batch 2)."""
    text = open(PAPER_CONFIG).read().replace("micro_batch_size: 5", "micro_batch_size: 2").replace(
        "global_batch_size: 800", "global_batch_size: 12").replace("tensor: 1", f"tensor: {tensor}")
    path = tmp_path / f"t{tensor}.yaml"
    path.write_text(text)
    return str(path)


def test_tensor_groups_never_span_nodes_unmarked(tmp_path, capsys):
    """Issue 20 case 4: 2 nodes x 3 GPUs: T = 2 would put ranks 2 and 3 on two nodes. The planner
    proposes no such layout; a config that asks for it is timed at the InfiniBand bandwidth and says so."""
    config = _layout_yaml(tmp_path, tensor=2)
    code, out, err = _run(["--config", config, "--nodes", "2", "--gpus-per-node", "3", "--gpu", "a100-80gb",
                           "--json"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    ranked, last = rows[:-1], rows[-1]
    assert {c["tensor"] for c in ranked} == {1}  # T must divide 3 GPUs per node (T = 3: 32 heads do not divide)
    assert last["own"] and last["tensor"] == 2 and "span nodes" in last["not_ranked"]
    # The same layout on 3 nodes x 2 GPUs keeps each tensor group in a node: faster at NVLink speed.
    code, out, err = _run(["--config", config, "--nodes", "3", "--gpus-per-node", "2", "--gpu", "a100-80gb",
                           "--json"], capsys)
    inside = next(c for c in map(json.loads, out.splitlines()) if c["own"])
    assert "not_ranked" not in inside and inside["tensor"] == 2
    assert last["step_s"] > 1.2 * inside["step_s"]
    code, out, err = _run(["--config", config, "--nodes", "2", "--gpus-per-node", "3", "--gpu", "a100-80gb"], capsys)
    assert "this config's layout (not ranked: tensor groups would span nodes (T must divide the GPUs per node): T=2 " \
           "on 3 GPUs per node; timed at the InfiniBand bandwidth):" in out
    assert "tensor groups would span nodes (T must divide the GPUs per node)" in out.split("refused by the")[1]


def test_nothing_proposed_is_refused_by_the_run_config(paper_json):
    run = load_run_config(PAPER_CONFIG, check_data=False)
    for c in paper_json:
        layout = Layout(c["tensor"], c["pipeline"], c["data"], c["micro_batch"], c["zero_stage"],
                        c["activation_checkpointing"], c["sequence_parallel"])
        with_layout(run, layout).validate(world_size=160, check_data=False)  # raises ConfigError if refused
    assert {c["zero_stage"] for c in paper_json if c["pipeline"] > 1} == {1}  # pipelines only with ZeRO-1


def test_layouts_that_do_not_fit_name_the_item_that_breaks_them(capsys):
    code, out, _ = _run(["--config", PAPER_CONFIG, "--nodes", "1", "--gpus-per-node", "8", "--gpu", "a100-40gb",
                         "--memory-gb", "1"], capsys)
    assert code == 0
    assert "no layout fits" in out
    assert "does not fit" in out or "do not fit" in out
    assert "largest item activations" in out


def _pipeline_builds(rank, cases):
    """Build every proposed pipeline partition for real: the builder's own checks must accept them."""
    from megamobi.parallel import Layout as Groups
    from megamobi.parallel import ParallelGroups, build_parallel_model

    for run, (t, p) in cases:
        groups = ParallelGroups(Groups.for_world(world_size=4, tensor=t, pipeline=p))
        build_parallel_model(run.model_config, groups, seed=0, partition_method=run.parallel.partition_method)


def test_proposed_pipeline_partitions_are_accepted_by_the_builder(tmp_path, capsys):
    """A 4-layer model on 4 GPUs: the 'parameters' partition leaves some stages without an FFN; the
    planner must not propose those, and every one it proposes must build."""
    run = from_dict(RunConfig, {
        "run_dir": str(tmp_path / "run"), "data": {"paths": ["elsewhere"]},
        "model": {"name": "p", "vocab_size": 256, "hidden_size": 32, "num_layers": 4, "num_attention_heads": 4,
                  "intermediate_size": 48, "max_seq_len": 64},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": 32}, "train": {"steps": 2},
        "optimizer": {"warmup_steps": 0}, "precision": "fp32"}, where="test")
    config = write_run_yaml(tmp_path / "run.yaml", run)
    code, out, err = _run(["--config", str(config), "--nodes", "1", "--gpus-per-node", "4", "--gpu", "h100-80gb",
                           "--json"], capsys)
    assert code == 0, err
    proposed = {(c["tensor"], c["pipeline"]) for c in map(json.loads, out.splitlines()) if c["pipeline"] > 1}
    assert proposed, "no pipeline layout proposed"
    cases = [(dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, tensor=t, pipeline=p, zero_stage=1)),
              (t, p)) for t, p in sorted(proposed)]
    run_ranks(_pipeline_builds, world_size=4, args=(cases,))


def _train(rank, run):
    from megamobi.training.loop import Trainer

    Trainer(run).train()


def test_for_run_compares_with_what_the_run_measured(tmp_path, token_shards, capsys):
    run = from_dict(RunConfig, {
        "run_dir": str(tmp_path / "run"), "data": {"paths": [str(token_shards)], "seed": 1},
        "model": {"name": "f", "vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 48, "max_seq_len": 64},
        "batch": {"micro_batch_size": 2, "global_batch_size": 4, "seq_len": 32},
        "train": {"steps": 3, "log_interval": 1}, "optimizer": {"warmup_steps": 0}, "precision": "fp32"}, where="test")
    config = write_run_yaml(tmp_path / "run.yaml", run)
    run_ranks(_train, world_size=2, args=(run,))
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "tokens_per_s" in s]
    code, out, err = _run(["--config", str(config), "--nodes", "1", "--gpus-per-node", "2", "--gpu", "h100-80gb",
                           "--json", "--for-run", str(tmp_path / "run")], capsys)
    assert code == 0, err
    report = json.loads(out.splitlines()[-1])["for_run"]
    assert report["steps_logged"] == len(steps) == 3
    assert report["measured_tokens_per_s"] == pytest.approx(sum(s["tokens_per_s"] for s in steps[1:]) / 2, rel=1e-3)
    assert report["measured_peak_memory_gb"] == pytest.approx(max(s["memory_gb"] for s in steps), abs=1e-3)
    assert report["measured_peak_memory_gb_any_rank"] == pytest.approx(max(s["memory_gb_max"] for s in steps), abs=1e-3)
    assert report["measured_peak_memory_gb_any_rank"] >= report["measured_peak_memory_gb"] - 1e-3
    assert report["estimated_tokens_per_s"] > 0 and report["estimated_allocated_gb"] > 0
    code, out, err = _run(["--config", str(config), "--nodes", "1", "--gpus-per-node", "2", "--gpu", "h100-80gb",
                           "--top", "2", "--for-run", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert f"measured {report['measured_tokens_per_s']:,.0f}" in out and "memory_gb_max" in out

    # Issue 20 case 5: another model or layout than the run's is refused, naming what differs, before any output.
    zero2 = write_run_yaml(tmp_path / "zero2.yaml", dataclasses.replace(
        run, parallel=dataclasses.replace(run.parallel, zero_stage=2)))  # the run's config with another ZeRO stage
    for other, expected in ((PAPER_CONFIG, "model.hidden_size 32 (run) vs 2048 (estimate)"),
                            (zero2, "parallel.zero_stage 1 (run) vs 2 (estimate)")):
        code, out, err = _run(["--config", str(other), "--nodes", "1", "--gpus-per-node", "2", "--gpu", "h100-80gb",
                               "--for-run", str(tmp_path / "run")], capsys)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "that run trained another model or layout than this estimate is for" in err and expected in err, err
    assert "data-parallel size 2 (run) vs" not in err  # only what differs is named

    (tmp_path / "run" / "metrics.jsonl").write_text("not json\n")
    code, _, err = _run(["--config", str(config), "--nodes", "1", "--gpus-per-node", "2", "--gpu", "h100-80gb",
                         "--for-run", str(tmp_path / "run")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "metrics.jsonl:1" in err
