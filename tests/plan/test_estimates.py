"""The planner's arithmetic on the paper's model: the pieces that the measured tests do not reach
(precision of the compute peak, the 1F1B bubble and in-flight micro batches, the cross-stage FFN
reduction, the data-parallel link)."""

import dataclasses
from pathlib import Path

import pytest

from megamobi.model import flops_per_token
from megamobi.plan.catalogue import CATALOGUE, gpu_with_overrides
from megamobi.plan.inventory import stages
from megamobi.plan.layouts import Layout
from megamobi.plan.memory import layer_activation_bytes
from megamobi.plan.planner import evaluate
from megamobi.training.run_config import load_run_config

A100 = CATALOGUE["a100-80gb"]


@pytest.fixture(scope="module")
def run():
    return load_run_config(Path(__file__).resolve().parents[2] / "configs/pretrain-mobillama-0.5b.yaml", check_data=False)


def test_compute_time_is_the_models_flops_at_the_stated_fraction(run):
    c = evaluate(run, Layout(1, 1, 160, 5, 1, "none", False), gpu=A100, gpus_per_node=8, compute_fraction=0.5)
    tokens_per_gpu = 800 * 2048 / 160
    expected = tokens_per_gpu * flops_per_token(run.model_config, seq_len=2048) / (312e12 * 0.5)
    assert c.time.parts["compute"] == pytest.approx(expected, rel=0.01)  # the head's FLOPs are in both
    fp32 = dataclasses.replace(run, precision="fp32")
    c32 = evaluate(fp32, Layout(1, 1, 160, 5, 0, "none", False), gpu=A100, gpus_per_node=8, compute_fraction=0.5)
    assert c32.time.parts["compute"] == pytest.approx(expected * 312 / 19.5, rel=0.01)
    faster = gpu_with_overrides("a100-80gb", peak_tflops=624.0)
    c2 = evaluate(run, Layout(1, 1, 160, 5, 1, "none", False), gpu=faster, gpus_per_node=8, compute_fraction=0.5)
    assert c2.time.parts["compute"] == pytest.approx(expected / 2, rel=0.01)


def test_pipeline_bubble_in_flight_micro_batches_and_the_shared_ffn(run):
    c = evaluate(run, Layout(1, 4, 40, 1, 1, "none", False), gpu=A100, gpus_per_node=8)
    micro_batches = 800 // 40
    per_slot = (c.time.parts["compute"]) / micro_batches  # no tensor parallelism: compute only
    assert c.time.parts["pipeline_bubble"] >= 3 * per_slot  # (P - 1) slots of the slowest stage
    assert c.time.parts["shared_ffn_tie"] > 0  # the FFN's gradient crosses all four stages
    # stage 0 holds P = 4 micro batches in flight: more activation per layer than stage 3 (one)
    stage_list = stages(run.model_config, tensor=1, pipeline=4, partition_method=run.parallel.partition_method)
    assert [s.shared_ffn_params for s in stage_list] == [3 * 2048 * 5632] * 4
    assert c.memory.stage == 0
    kept, _ = layer_activation_bytes(run.model_config, seq=2048, micro=1, tensor=1, sequence_parallel=False, e=2.0,
                                     checkpointing="none", pipeline=4)
    outside = 12 * 2 * 2048 * 2048  # embedding output etc., on the first stage
    assert c.memory.activations == pytest.approx(4 * (stage_list[0].decoder_layers * kept + outside))


def test_data_parallel_traffic_stays_on_nvlink_within_a_node(run):
    one_node = evaluate(run, Layout(1, 1, 8, 5, 1, "none", False), gpu=A100, gpus_per_node=8)
    many = evaluate(run, Layout(1, 1, 160, 5, 1, "none", False), gpu=A100, gpus_per_node=8)
    assert one_node.time.parts["data_comm"] * 8 < many.time.parts["data_comm"]  # 300 vs 25 GB/s
