"""The recovery rules that need no CLI (forked gloo ranks, MEGAMOBI_FAULTS set in each rank):

- three data-parallel replicas: a flipped copy is named at once by the majority; the re-run agrees;
- the shared FFN's replicas on two pipeline stages are checked too (no majority: the re-run names it);
- train.divergence.max_rewinds stops the run, saying why; action: stop stops at the first bad step,
  naming the rank and the newest healthy checkpoint.
"""

import os
from pathlib import Path

from multiproc import run_ranks
from training_runs import make_run, read_metrics

from megamobi.training.events import read_events
from megamobi.training.loop import NonFiniteLossError, Trainer


def _train(rank, run, faults):
    os.environ["MEGAMOBI_FAULTS"] = faults  # this forked rank only
    try:
        Trainer(run).train()
    except NonFiniteLossError as err:
        return str(err)
    return None


def _kinds(run_dir: Path) -> list[tuple]:
    return [(e["step"], e["kind"], e["ranks"]) for e in read_events(run_dir)]


def test_three_replicas_name_the_flipped_one_by_majority_then_max_rewinds_stop(tmp_path, token_shards):
    run = make_run(tmp_path / "r", token_shards, batch={"micro_batch_size": 1, "global_batch_size": 6, "seq_len": 32},
                   train={"steps": 6, "seed": 11, "log_interval": 1, "consistency_check_interval": 2,
                          "divergence": {"action": "rewind", "max_rewinds": 1}},
                   checkpoint={"interval_tokens": 6 * 32})
    errors = run_ranks(_train, world_size=3, args=(run, "flip:step=2:rank=2;nan:step=5:rank=1"))
    events = read_events(tmp_path / "r")
    mismatch = events[0]
    assert (mismatch["kind"], mismatch["step"], mismatch["ranks"], mismatch["majority"]) == ("replica_mismatch", 2, [2], True)
    assert mismatch["action"] == "rewind to step_0000001"
    assert _kinds(tmp_path / "r")[1:] == [(2, "transient", [2]), (5, "non_finite", [1])]
    assert events[-1]["action"] == "stopped (max_rewinds)"
    assert all("already rewound 1 time(s) (train.divergence.max_rewinds 1)" in e for e in errors)
    assert [m["step"] for m in read_metrics(tmp_path / "r") if "loss" in m] == [1, 2, 3, 4]  # 5 never applied


def test_the_shared_ffn_replicas_of_pipeline_stages_are_compared(tmp_path, token_shards):
    sections = dict(parallel={"pipeline": 2, "zero_stage": 1}, checkpoint={"interval_tokens": 8 * 32},
                    train={"steps": 3, "seed": 11, "log_interval": 1, "consistency_check_interval": 1})
    run = make_run(tmp_path / "p", token_shards, **sections)
    assert run_ranks(_train, world_size=2, args=(run, "flip:step=2:rank=1")) == [None, None]
    mismatch, verdict = read_events(tmp_path / "p")
    assert mismatch["kind"] == "replica_mismatch" and mismatch["ranks"] == [0, 1] and not mismatch["majority"]
    assert mismatch["tensors"] and all(t.startswith("mlps.0.") for t in mismatch["tensors"])
    assert (verdict["kind"], verdict["step"], verdict["ranks"]) == ("transient", 2, [1])
    # The in-process rewind of a pipeline engine re-runs bit for bit.
    run_ranks(_train, world_size=2, args=(make_run(tmp_path / "reference", token_shards, **sections), ""))
    losses = [[m["loss"] for m in read_metrics(tmp_path / d) if "loss" in m] for d in ("p", "reference")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_action_stop_names_the_rank_and_the_checkpoint_to_resume_from(tmp_path, token_shards):
    run = make_run(tmp_path / "s", token_shards, train={"steps": 4, "seed": 11, "log_interval": 1,
                                                        "divergence": {"action": "stop"}},
                   checkpoint={"interval_tokens": 8 * 32})
    errors = run_ranks(_train, world_size=2, args=(run, "nan:step=3:rank=1"))
    assert all("step 3: non-finite loss" in e and "on rank 1 (" in e and "step_0000002" in e for e in errors), errors
    assert _kinds(tmp_path / "s") == [(3, "non_finite", [1])]
    assert [p.name for p in sorted((tmp_path / "s" / "checkpoints").glob("step_*"))] == ["step_0000001", "step_0000002"]


def test_the_hang_report_names_stopped_behind_and_silent_ranks():
    from megamobi.training.watchdog import name_culprits

    def beat(step, phase, *, age=0.0, micro_batch=0):
        return {"step": step, "phase": phase, "micro_batch": micro_batch, "host": "h", "pid": 1, "in_phase_s": 9.0,
                "written_at": 1000.0 - age}

    same = {r: beat(7, "backward", micro_batch=1) for r in range(4)}
    assert name_culprits(same, world_size=4, now=1000.0, stale_after_s=5) == []  # all wait in one collective
    named = name_culprits({**same, 1: beat(7, "forward", age=30), 2: beat(7, "data")}, world_size=5, now=1000.0,
                          stale_after_s=5)
    assert [c["rank"] for c in named] == [4, 1, 2]  # no heartbeat at all, heartbeat stopped, behind
    assert "never wrote a heartbeat" in named[0]["why"] and "heartbeat stopped 30 s ago" in named[1]["why"]
    assert named[2]["why"].startswith("behind: at step 7 data")
