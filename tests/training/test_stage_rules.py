"""The rules behind data stages and wsd, case by case, without training: the wsd formula and its shapes,
token boundaries rounded by one rule (a stage boundary and a decay start at the same tokens meet at the
same step), and what a resume may change (megamobi/training/stage_checks.py, schedule_checks.py)
against checkpoint manifests written as the trainer writes them. The 2-rank CLI run that exercises
them end to end is tests/training/test_data_stages.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
from training_runs import make_run

from megamobi.data.stages import stage_index_at, stages_of
from megamobi.files import sha256_file
from megamobi.training.run_config import load_run_config
from megamobi.training.schedule import LrSchedule, learning_rate
from megamobi.training.schedule_checks import schedule_changes
from megamobi.training.stage_checks import stage_changes

TPS = 8 * 32  # make_run: 8 sequences of 32 tokens a step


def test_wsd_shapes_hold_then_decay_to_min_lr():
    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110, decay_start_step=60)
    for shape, f in (("linear", lambda p: 1 - p), ("cosine", lambda p: (1 + math.cos(math.pi * p)) / 2),
                     ("1-sqrt", lambda p: 1 - math.sqrt(p))):
        lr = [learning_rate(s, decay_shape=shape, **kw) for s in range(120)]
        assert lr[5] == 0.5 and lr[10:61] == [1.0] * 51  # warmup, then held, the first decay step included
        assert lr[85] == pytest.approx(0.1 + 0.9 * f(0.5)) and lr[109] == pytest.approx(0.1 + 0.9 * f(49 / 50))
        assert lr[110:] == [0.1] * 10
    # Without a decay start: the paper's cosine from the end of warmup, unchanged.
    assert learning_rate(60, lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=110) == pytest.approx(0.55)


def test_one_rounding_rule_for_every_token_boundary(repo_root):
    """The annealing config: stage 2 and the decay both begin at step 701,906; decay_tokens = 50B says the same."""
    run = load_run_config(repo_root / "configs/pretrain-mobillama-0.5b-anneal.yaml", check_data=False)
    schedule = LrSchedule.of_run(run)
    assert schedule.decay_start_step == 701_905 and schedule.total_steps == 732_422
    stages = run.data_stages
    assert stage_index_at(stages, 701_904 * run.tokens_per_step) == 0  # tokens before step 701,905 (1-based)
    assert stage_index_at(stages, 701_905 * run.tokens_per_step) == 1
    by_length = dataclasses.replace(run, optimizer=dataclasses.replace(
        run.optimizer, decay_start_tokens=None, decay_tokens=50_000_000_000))
    assert LrSchedule.of_run(by_length).decay_start_step == 701_905
    assert schedule(701_904) == 3e-4 and schedule(701_905) == 3e-4 and 0 < schedule(732_421) < 1e-8


def test_a_run_without_stages_is_the_one_stage_case(tmp_path, token_shards):
    plain = make_run(tmp_path, token_shards, data={"paths": [str(token_shards)], "seed": 7, "val_fraction": 0.1})
    staged = make_run(tmp_path, token_shards, data={"paths": [], "seed": 7, "stages": [
        {"paths": [str(token_shards)], "val_fraction": 0.1, "until_tokens": 3 * TPS}, {"paths": [str(token_shards)]}]})
    [only] = plain.data_stages
    first, second = staged.data_stages
    assert only.data_record() == first.data_record() == {"paths": [str(token_shards)], "source_weights": None,
                                                         "val_fraction": 0.1, "seed": 7}
    assert second.data_record()["seed"] == 7 and second.data_record()["shuffle_seed"] not in (7, None)


def _manifest(run, *, step: int, stage: int = 0) -> dict:
    """What a checkpoint of `run` after `step` records (megamobi.json), stage `stage` running."""
    paths = {p for s in run.data_stages for p in s.paths}
    return {"step": step, "consumed_samples": step * 8, "consumed_tokens": step * TPS,
            "run_config": dataclasses.asdict(run), "data_manifests": {p: sha256_file(f"{p}/manifest.json") for p in paths},
            "data_stage": {"index": stage, "start_samples": 0, "start_tokens": 0, "first_step": 1}}


def _stages(shards, *untils, weights=None, paths=None):
    listed = [{"paths": [str(shards)], "until_tokens": u} for u in untils] + [{"paths": paths or [str(shards)]}]
    if weights:
        listed[-1]["source_weights"] = weights
    return {"paths": [], "seed": 7, "stages": listed}


def test_what_a_resume_may_change_in_the_stages(tmp_path, token_shards, repo_root):
    def run(data, steps=8):
        return make_run(tmp_path, token_shards, data=data, train={"steps": steps, "seed": 11, "log_interval": 1})

    plain = run({"paths": [str(token_shards)], "seed": 7})
    # A plain run decides to anneal at step 3: its data becomes stage 1 (ending ahead), a stage is appended.
    accepted, refused = stage_changes(_manifest(plain, step=3), run(_stages(token_shards, 5 * TPS, weights={"c4": 1})))
    assert refused == [] and accepted == [
        "data.stages[0].until_tokens: None -> 1280 (stage 1 is running; its new end is still ahead)",
        "data.stages[1] (stage 2) appended"]
    # ... but not ending stage 1 before the tokens it has already trained.
    _, refused = stage_changes(_manifest(plain, step=3), run(_stages(token_shards, 3 * TPS)))
    assert refused == ["data.stages[0].until_tokens: None -> 768 (it would end stage 1 before the 768 tokens it has "
                       "trained)"]
    staged = run(_stages(token_shards, 4 * TPS, weights={"c4": 1}))
    # Stage 2 not started (step 3; also at exactly the boundary, step 4): change it, move stage 1's end, drop it.
    for step in (3, 4):
        accepted, refused = stage_changes(_manifest(staged, step=step), run(_stages(token_shards, 4 * TPS, weights={"arxiv": 1})))
        assert refused == [] and accepted == ["data.stages[1].source_weights: {'c4': 1.0} -> {'arxiv': 1.0} (stage 2, "
                                              "not started)"]
    accepted, refused = stage_changes(_manifest(staged, step=3), run({"paths": [], "seed": 7, "stages": [
        {"paths": [str(token_shards)]}]}))
    assert refused == [] and accepted == [
        "data.stages[0].until_tokens: 1024 -> None (stage 1 is running; its new end is still ahead)",
        "data.stages[1] (stage 2, not started) removed"]
    # Stage 1 finished (step 4 reached its end): its end is frozen. Stage 2 started (step 5): its data is too.
    _, refused = stage_changes(_manifest(staged, step=4), run(_stages(token_shards, 6 * TPS, weights={"c4": 1})))
    assert refused == ["data.stages[0].until_tokens: 1024 -> 1536 (stage 1 finished at 1,024 tokens or before)"]
    _, refused = stage_changes(_manifest(staged, step=5, stage=1), run(_stages(token_shards, 4 * TPS, weights={"arxiv": 1})))
    assert refused == ["data.stages[1].source_weights: {'c4': 1.0} -> {'arxiv': 1.0}"]
    _, refused = stage_changes(_manifest(staged, step=5, stage=1), run({"paths": [], "seed": 8, "stages": [
        {"paths": [str(token_shards)], "until_tokens": 4 * TPS}, {"paths": [str(token_shards)], "source_weights": {"c4": 1}}]}))
    assert refused == ["data.seed: 7 -> 8"]


def test_what_a_resume_may_change_in_a_wsd_schedule(tmp_path, token_shards):
    def run(steps, decay_tokens, style="wsd", **optimizer):
        extra = {"decay_style": style, "decay_tokens": decay_tokens} if style == "wsd" else {}
        return make_run(tmp_path, token_shards, train={"steps": steps, "seed": 11, "log_interval": 1},
                        optimizer={"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, **extra, **optimizer})

    wsd = run(10, 2 * TPS)  # decay over steps 9-10
    changes, why = schedule_changes(_manifest(wsd, step=5), run(14, 3 * TPS, decay_shape="1-sqrt"))
    assert why is None and changes == ["steps: 10 -> 14", "decay start step: 9 -> 12", "decay shape: linear -> 1-sqrt"]
    changes, why = schedule_changes(_manifest(wsd, step=8), run(14, 2 * TPS))  # step 9 is the first decay step
    assert why is None
    changes, why = schedule_changes(_manifest(wsd, step=9), run(14, 2 * TPS))
    assert changes == ["steps: 10 -> 14", "decay start step: 9 -> 13"] and why.startswith("the decay began at step 9")
    _, why = schedule_changes(_manifest(wsd, step=5), run(10, 6 * TPS))  # the new decay would start at step 5
    assert "the new decay start (step 5) is not after the checkpoint's step 5" in why
    _, why = schedule_changes(_manifest(wsd, step=5), run(10, 2 * TPS, lr=2e-2))
    assert why.startswith("lr / warmup_steps changed")
    _, why = schedule_changes(_manifest(wsd, step=1), run(10, None, style="cosine"))
    assert why.startswith("the decay style changed")
    # Two cosine schedules: any change is refused (issue 17), saying what the next step's lr would become.
    cosine = run(10, None, style="cosine")
    changes, why = schedule_changes(_manifest(cosine, step=5), run(12, None, style="cosine", min_lr=2e-3))
    assert changes == ["optimizer.min_lr: 0.001 -> 0.002", "steps: 10 -> 12"]
    longer = LrSchedule.of_run(run(12, None, style="cosine", min_lr=2e-3))
    assert why == (f"a cosine schedule's lr depends on all of these at every step: the next step (6) would run at lr "
                   f"{longer(5):.4g} instead of {LrSchedule.of_run(cosine)(5):.4g}")
    assert schedule_changes(_manifest(cosine, step=5), cosine) == ([], None)
    assert schedule_changes(_manifest(wsd, step=5), wsd) == ([], None)
    assert stages_of({"paths": ["a"]})[0].key == "data"


def test_a_new_global_batch_must_divide_what_the_running_stage_consumed(tmp_path, token_shards):
    """Stage 2 began after 40 samples (5 steps of 8); at 48 samples a global batch of 16 divides the run's
    samples but not the stage's 8: its order could not continue in whole batches."""
    from megamobi.config_io import ConfigError
    from megamobi.training.stage_checks import check_stage_position

    def run(gb):
        return make_run(tmp_path, token_shards, data=_stages(token_shards, 5 * TPS),
                        batch={"micro_batch_size": 2, "global_batch_size": gb, "seq_len": 32})

    manifest = {"consumed_samples": 48, "consumed_tokens": 48 * 32,
                "data_stage": {"index": 1, "start_samples": 40, "start_tokens": 40 * 32, "first_step": 6}}
    check_stage_position(run(8), manifest, checkpoint=tmp_path)
    with pytest.raises(ConfigError, match="global_batch_size 16 does not divide the 8 samples that stage 2 has consumed"):
        check_stage_position(run(16), manifest, checkpoint=tmp_path)
