"""Megatron-style sequence parallelism (tensor parallelism with the residual stream split along the
sequence) against the single-process plain model: 5 AdamW steps with clipping under (T,P,D) =
(2,1,1), (2,1,2) with ZeRO-1 and ZeRO-2, and (2,2,1); plus the forward itself, activation
checkpointing, and the sequence-length checks.

The norm weights see only their sequence chunk; without the gradient hook that sums their gradients
over the tensor group these runs drift (final weights ~2e-2 off, grad norm ~5e-3 relative).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from multiproc import run_ranks
from parity_jobs import SEED, SEQ_LEN, batch, max_abs_diff, parallel_run, parallel_runs, reference_run, tiny_config

from megamobi.config_io import ConfigError
from megamobi.model import MobiLlama
from megamobi.parallel.tensor_plan import validate_layout
from megamobi.training.run_config import (
    BatchConfig,
    DataConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)

CONFIG = tiny_config(num_layers=4)  # vocab 1001: padded under T=2
SP = {"sequence_parallel": True}
JOBS = {
    2: [((2, 1, 1), SP)],
    4: [((2, 1, 2), SP), ((2, 1, 2), {**SP, "zero_stage": 2}), ((2, 2, 1), SP)],
}
RUNS = [(layout, opts) for runs in JOBS.values() for layout, opts in runs]


def _run_id(run) -> str:
    (t, p, d), opts = run
    return f"T{t}P{p}D{d}-zero{opts.get('zero_stage', 1)}"


def _forward_job(rank: int) -> dict:
    """On 2 ranks: the SP model's forward against the plain model's, what each block sees, the
    markers, a 2-step activation-checkpointed run, and the error for a sequence T does not divide."""
    import torch.distributed as dist

    from megamobi.parallel.build import build_parallel_model
    from megamobi.parallel.groups import Layout, ParallelGroups

    groups = ParallelGroups(Layout(tensor=2))
    out: dict = {}
    model = build_parallel_model(CONFIG, groups, seed=SEED, sequence_parallel=True).module
    seen: dict = {}

    def record(key, module, tensor_of):
        def hook(module, args, output):  # returns None: the output is left alone
            seen.setdefault(key, tuple(tensor_of(args, output).shape))
        module.register_forward_hook(hook)

    record("norm", model.layers[0].input_layernorm, lambda a, o: a[0])
    record("q_in", model.layers[0].self_attn.q_proj, lambda a, o: a[0])
    record("down_out", model.mlps[0].down_proj, lambda a, o: o)
    inputs, _ = batch(CONFIG, 0)
    with torch.no_grad():
        local = model(inputs)
    parts = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(parts, local, group=groups.tensor_group)
    out["logits"] = torch.cat(parts, dim=-1)[..., :CONFIG.vocab_size].numpy()
    out["seen"] = seen
    out["marked"] = sorted(n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False))
    try:
        model(inputs[:, :SEQ_LEN - 1])
    except ConfigError as err:
        out["odd_length_error"] = str(err)
    out["parity"] = parallel_runs(rank, CONFIG, [layout for layout, _ in JOBS[2]], "parameters",
                                  [opts for _, opts in JOBS[2]])
    out["checkpointed"] = parallel_run(rank, CONFIG, (2, 1, 1), "parameters", steps=2,
                                       activation_checkpointing=True, sequence_parallel=True)
    return out


@pytest.fixture(scope="module")
def reference():
    return reference_run(CONFIG)


@pytest.fixture(scope="module")
def forward_results():
    return run_ranks(_forward_job, world_size=2)


@pytest.fixture(scope="module")
def results(forward_results):
    out = {_run_id(run): [r["parity"][0] for r in forward_results] for run in JOBS[2]}
    per_rank = run_ranks(parallel_runs, world_size=4,
                         args=(CONFIG, [layout for layout, _ in JOBS[4]], "parameters", [opts for _, opts in JOBS[4]]))
    for i, run in enumerate(JOBS[4]):
        out[_run_id(run)] = [rank_results[i] for rank_results in per_rank]
    return out


def test_forward_matches_plain_model_on_sequence_chunks(forward_results):
    torch.manual_seed(SEED)
    plain = MobiLlama(CONFIG)
    with torch.no_grad():
        expected = plain(batch(CONFIG, 0)[0]).numpy()
    b, t, d = batch(CONFIG, 0)[0].shape + (CONFIG.hidden_size,)
    for r in forward_results:
        np.testing.assert_allclose(r["logits"], expected, rtol=1e-5, atol=1e-5)
        # Norms run on the local chunk; q/k/v see the full (gathered) sequence; down reduce-scatters.
        assert r["seen"] == {"norm": (b, t // 2, d), "q_in": (b, t, d), "down_out": (b, t // 2, d)}


def test_norm_weights_are_marked_and_nothing_else(forward_results):
    expected = sorted([f"layers.{i}.{n}.weight" for i in range(CONFIG.num_layers)
                       for n in ("input_layernorm", "post_attention_layernorm")] + ["norm.weight"])
    for r in forward_results:
        assert r["marked"] == expected


def test_sequence_not_divisible_by_tensor_is_a_clear_error(forward_results):
    for r in forward_results:
        assert "divisible by 2" in r["odd_length_error"] and str(SEQ_LEN - 1) in r["odd_length_error"]


def test_activation_checkpointing_with_sequence_parallel(forward_results, reference):
    for r in forward_results:
        np.testing.assert_allclose(r["checkpointed"]["losses"], reference["losses"][:2], rtol=1e-5)
        np.testing.assert_allclose(r["checkpointed"]["norms"], reference["norms"][:2], rtol=1e-4)


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_losses_and_grad_norms_match(results, reference, run):
    for rank, result in enumerate(results[_run_id(run)]):
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5, err_msg=f"rank {rank}")
        np.testing.assert_allclose(result["norms"], reference["norms"], rtol=1e-4, err_msg=f"rank {rank}")


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_final_full_weights_match(results, reference, run):
    final = results[_run_id(run)][0]["final"]
    assert max_abs_diff(final, reference["final"]) < 1e-4


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_norm_weights_stay_identical_across_tensor_ranks(results, run):
    for result in results[_run_id(run)]:
        assert result["tensor_replicas_ok"] == [True] * len(result["losses"])


def test_pipeline_shared_ffn_tie_still_sums_every_layer(results, reference):
    for result in results[_run_id(((2, 2, 1), SP))]:
        assert result["replicas_ok"] == [True] * len(result["losses"])
        for key, grad in result["tied_grads"].items():
            np.testing.assert_allclose(grad, reference["first_grads"][key], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"tensor": 1, "seq_len": 32}, "needs parallel.tensor >= 2"),
    ({"tensor": 2, "seq_len": 33}, "sequence length 33 is not divisible by parallel.tensor = 2"),
])
def test_validate_layout_refuses_sequence_parallel(kwargs, message):
    layout = {"pipeline": 1, "world_size": kwargs["tensor"], "zero_stage": 1}
    with pytest.raises(ConfigError, match=message):
        validate_layout(CONFIG, **layout, sequence_parallel=True, **kwargs)
    validate_layout(CONFIG, **layout, **kwargs)  # fine without sequence parallelism
    validate_layout(CONFIG, tensor=2, pipeline=2, world_size=4, zero_stage=1, sequence_parallel=True, seq_len=32)


def _run_config(tmp_path, **parallel) -> RunConfig:
    (tmp_path / "manifest.json").write_text("{}")
    return RunConfig(run_dir=str(tmp_path / "run"), model=dataclasses.replace(CONFIG, max_seq_len=256),
                     data=DataConfig(paths=[str(tmp_path)]),
                     batch=BatchConfig(micro_batch_size=1, global_batch_size=8, seq_len=256),
                     optimizer=OptimizerConfig(warmup_steps=0), train=TrainConfig(steps=10),
                     parallel=ParallelConfig(**parallel))


def test_run_config_sequence_parallel(tmp_path):
    _run_config(tmp_path, tensor=2, sequence_parallel=True).validate(world_size=4)
    with pytest.raises(ConfigError, match="needs parallel.tensor >= 2"):
        _run_config(tmp_path, sequence_parallel=True).validate()
    with pytest.raises(ConfigError, match="sequence length 256 is not divisible"):
        _run_config(tmp_path, tensor=3, sequence_parallel=True).validate()
