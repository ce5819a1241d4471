"""Tensor, pipeline and data parallel training against the single-process plain model.

For each config, one 2-rank job runs (T,P,D) = (2,1,1), (1,2,1) and one 4-rank job runs
(1,4,1), (2,2,1), (1,2,2), (2,1,2), sequentially, 5 AdamW steps each with gradient clipping.
"""

from __future__ import annotations

import numpy as np
import pytest
from multiproc import run_ranks
from parity_jobs import CLIP, max_abs_diff, parallel_runs, reference_run, tiny_config

CONFIGS = {
    # 4 layers: even; vocab 1001 is not a multiple of T=2 (padding).
    "tiny-4-layers": (tiny_config(num_layers=4), "parameters"),
    # 5 layers: odd, over 2 and 4 stages; partitioned by decoder layer count.
    "tiny-5-layers": (tiny_config(num_layers=5), "type:AttentionBlockPipe"),
}
JOBS = {2: [(2, 1, 1), (1, 2, 1)], 4: [(1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)]}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, partition = CONFIGS[request.param]
    reference = reference_run(config)
    results = {}
    for world, layouts in JOBS.items():
        per_rank = run_ranks(parallel_runs, world_size=world, args=(config, layouts, partition))
        for i, layout in enumerate(layouts):
            results[layout] = [rank_results[i] for rank_results in per_rank]
    return request.param, config, reference, results


ALL_LAYOUTS = [layout for layouts in JOBS.values() for layout in layouts]


def test_reference_exercises_clipping(case):
    _, _, reference, _ = case
    assert max(reference["norms"]) > CLIP


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda l: "T{}P{}D{}".format(*l))
def test_losses_match_on_every_rank(case, layout):
    _, _, reference, results = case
    for rank, result in enumerate(results[layout]):
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=1e-5, err_msg=f"rank {rank}")


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda l: "T{}P{}D{}".format(*l))
def test_grad_norm_matches_counting_replicas_once(case, layout):
    _, _, reference, results = case
    for rank, result in enumerate(results[layout]):
        np.testing.assert_allclose(result["norms"], reference["norms"], rtol=1e-4, err_msg=f"rank {rank}")


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda l: "T{}P{}D{}".format(*l))
def test_final_full_weights_match(case, layout):
    _, _, reference, results = case
    final = results[layout][0]["final"]
    assert all(r["final"] is None for r in results[layout][1:])
    assert max_abs_diff(final, reference["final"]) < 1e-4


@pytest.mark.parametrize("layout", [l for l in ALL_LAYOUTS if l[1] > 1], ids=lambda l: "T{}P{}D{}".format(*l))
def test_shared_ffn_replicas_identical_after_every_step(case, layout):
    _, _, _, results = case
    for result in results[layout]:
        assert result["replicas_ok"] == [True] * len(result["losses"])


@pytest.mark.parametrize("layout", [l for l in ALL_LAYOUTS if l[1] > 1], ids=lambda l: "T{}P{}D{}".format(*l))
def test_tied_gradient_is_the_sum_over_all_layers(case, layout):
    """After DeepSpeed's ReduceTiedGrads every stage holds the full-model gradient of the shared
    FFN (the sum over every layer on every stage), equal to single-process autograd's."""
    _, _, reference, results = case
    for result in results[layout]:
        grads = result["tied_grads"]
        assert set(grads) == {"mlps.0.gate_proj.weight", "mlps.0.up_proj.weight", "mlps.0.down_proj.weight"}
        for key, grad in grads.items():
            np.testing.assert_allclose(grad, reference["first_grads"][key], rtol=1e-4, atol=1e-7)
