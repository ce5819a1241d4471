"""Rank jobs for the static-memory test: build the engine exactly as the Trainer does (same
builder, ds_config, optimizer and deepspeed.initialize call), train two steps, and record the bytes
the engine holds at the two moments the static part peaks: after the last backward of a step
(gradients complete, before DeepSpeed's step) and inside the torch optimizer's step (fp32 gradient
copies, master weights and Adam moments all alive)."""

from __future__ import annotations

import torch
from engine_bytes import engine_bytes

from megamobi.config_io import from_dict
from megamobi.training.run_config import RunConfig

VOCAB, SEQ = 512, 32
MODEL = {"name": "plan-test", "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 4, "num_attention_heads": 4,
         "intermediate_size": 96, "max_seq_len": 64, "ffn_sharing": "shared"}
# ZeRO-3: partition every matrix (numel > 1000) and keep the norms whole, with a small reduce bucket,
# so that a tiny model still has both kinds of parameters and the bucket does not dwarf it.
ZERO_EXTRA = {"zero_optimization": {"stage3_param_persistence_threshold": 1000, "reduce_bucket_size": 20000}}


def make_run(*, tensor: int, pipeline: int, zero_stage: int, precision: str) -> RunConfig:
    return from_dict(RunConfig, {
        "run_dir": "unused", "model": dict(MODEL), "data": {"paths": ["not-needed"]},
        "batch": {"micro_batch_size": 2, "global_batch_size": 8, "seq_len": SEQ},
        "optimizer": {"warmup_steps": 0}, "train": {"steps": 2},
        "parallel": {"tensor": tensor, "pipeline": pipeline, "zero_stage": zero_stage,
                     "partition_method": "type:AttentionBlockPipe"},
        "precision": precision, "deepspeed": ZERO_EXTRA}, where="test")


def measure_job(rank: int, run: RunConfig) -> dict:
    import deepspeed
    import torch.distributed as dist

    from megamobi.parallel import Layout, ParallelGroups, build_parallel_model
    from megamobi.training.ds_config import build_ds_config
    from megamobi.training.optimizer import build_optimizer

    world = dist.get_world_size()
    run.validate(world_size=world, check_data=False)
    groups = ParallelGroups(Layout.for_world(world_size=world, tensor=run.parallel.tensor, pipeline=run.parallel.pipeline))
    built = build_parallel_model(run.model_config, groups, seed=1, partition_method=run.parallel.partition_method)
    ds_config = build_ds_config(run, world_size=world)
    for key, value in built.ds_config_overrides.items():
        ds_config[key] = {**ds_config.get(key, {}), **value}
    optimizer = build_optimizer(built.module, run.optimizer)
    engine, *_ = deepspeed.initialize(model=built.module, optimizer=optimizer, config=ds_config,
                                      mpu=None if built.is_pipeline else groups)
    samples: list[dict] = []
    step = {"n": 0}
    inner_step = optimizer.step

    def recording_step(*args, **kwargs):
        if step["n"] == 1:  # the second step: Adam's moments exist from the first
            samples.append(engine_bytes(engine))
        return inner_step(*args, **kwargs)

    optimizer.step = recording_step
    g = torch.Generator().manual_seed(rank // (run.parallel.tensor))
    accumulation = run.accumulation_steps(world)
    for step["n"] in range(2):
        batches = [torch.randint(0, VOCAB, (2, SEQ + 1), generator=g) for _ in range(accumulation)]
        if built.is_pipeline:
            engine.train_batch(iter([(b[:, :-1], b[:, 1:]) for b in batches]))
            continue
        for i, b in enumerate(batches):
            engine.backward(built.loss_fn(engine(b[:, :-1]), b[:, 1:]))
            if step["n"] == 1 and i == accumulation - 1:
                samples.append(engine_bytes(engine))
            engine.step()
    assert samples, "the optimizer step was never reached"
    peak = max(samples, key=lambda s: s["params"] + s["grads"] + s["optimizer"])
    stage = groups.pipeline_rank if built.is_pipeline else 0
    return {"stage": stage, "peak": peak, "optimizer_class": type(engine.optimizer).__name__}
