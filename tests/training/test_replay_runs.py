"""megamobi.replay against what real runs consumed: a 2-rank run (blend + validation split) recording
every micro-batch through the MEGAMOBI_RECORD_BATCHES hook, killed with -9, resumed as 2 pipeline
stages (one data-parallel rank), stopped by SIGUSR1, resumed on 2 data-parallel ranks again. The replay of all steps equals the record of the
attempt that each step's checkpoint descends from; the logged loss of step k is the loss of the
step k-1 checkpoint on the sequences replay lists for step k; --find and --mix agree."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from multiproc import run_ranks, start_ranks
from training_runs import make_run, read_metrics

from megamobi.checkpointing.manifest import checkpoint_model_config, read_manifest
from megamobi.checkpointing.model_files import read_full_model
from megamobi.data.replay import RunReplay
from megamobi.model import MobiLlama, language_model_loss
from megamobi.training.batch_record import ENV, tokens_hash
from megamobi.training.loop import Trainer

STEPS = 8
GB, SEQ = 8, 32


class StopsAfterStep6(Trainer):
    def _log_step(self, **kwargs):
        super()._log_step(**kwargs)
        if self.state.step == 6:
            os.kill(os.getpid(), signal.SIGUSR1)  # what SLURM sends before the time limit


def _train(rank, run, trainer=Trainer):
    trainer(run).train()


def _logged_step(run_dir: Path) -> int:
    try:
        return max((m["step"] for m in read_metrics(run_dir)), default=0)
    except (FileNotFoundError, ValueError):
        return 0


def _recorded(attempt_dirs):
    """{step: {(rank, micro_batch): [(sample, offset, hash), ...]}} from the last attempt that ran each step."""
    by_step = {}
    for attempt in attempt_dirs:
        steps = defaultdict(dict)
        for path in sorted(attempt.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the torn last line of a killed process
                steps[r["step"]][(r["rank"], r["micro_batch"])] = list(zip(r["sample_index"], r["offset"], r["hash"]))
        by_step.update(steps)
    return by_step


def test_replay_equals_what_each_rank_consumed_across_kill_and_reshard(tmp_path, token_shards, monkeypatch):
    settings = dict(train={"steps": STEPS, "seed": 11, "log_interval": 1},
                    data={"paths": [str(token_shards)], "seed": 7, "val_fraction": 0.1,
                          "source_weights": {"c4": 1.0, "arxiv": 2.0}},
                    checkpoint={"interval_tokens": GB * SEQ})  # every step: step k-1 exists for every k
    run = make_run(tmp_path / "run", token_shards, **settings)
    pipelined = make_run(tmp_path / "run", token_shards, parallel={"pipeline": 2, "zero_stage": 1}, **settings)
    attempts = [tmp_path / f"record{i}" for i in range(3)]
    # 1: two ranks, killed with -9 once step 5 is logged.
    monkeypatch.setenv(ENV, str(attempts[0]))
    procs, _ = start_ranks(_train, world_size=2, args=(run,))
    deadline = time.monotonic() + 300
    while _logged_step(tmp_path / "run") < 5:
        assert time.monotonic() < deadline and all(p.is_alive() for p in procs)
        time.sleep(0.005)
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.join()
    # 2: two pipeline stages, so one data-parallel rank (a resharded resume), stopped by SIGUSR1 after
    # step 6; 3: two data-parallel ranks again, to the end.
    monkeypatch.setenv(ENV, str(attempts[1]))
    run_ranks(_train, world_size=2, args=(pipelined, StopsAfterStep6))
    monkeypatch.setenv(ENV, str(attempts[2]))
    run_ranks(_train, world_size=2, args=(run,))

    run_dir = tmp_path / "run"
    provenance = read_manifest(run_dir / "checkpoints" / f"step_{STEPS:07d}")["data_provenance"]
    assert [s["data_parallel_size"] for s in provenance] == [2, 1, 2]
    assert provenance[1]["last_step"] == 6 and provenance[2]["first_step"] == 7

    # The replay, through the real CLI, equals the record step by step, rank by rank, micro-batch by micro-batch.
    out = subprocess.run([sys.executable, "-m", "megamobi.replay", str(run_dir), "--steps", f"1:{STEPS}", "--json"],
                         capture_output=True, text=True, check=True).stdout
    replayed = defaultdict(lambda: defaultdict(list))
    lines = [json.loads(line) for line in out.splitlines()]
    assert set(lines[0]) == {"step", "stage", "rank", "micro_batch", "sample_index", "shard", "row", "offset", "source",
                             "tokens", "skipped"}
    assert not any(r["skipped"] for r in lines)
    for r in lines:
        assert len(r["tokens"]) == SEQ + 1
        replayed[r["step"]][(r["rank"], r["micro_batch"])].append((r["sample_index"], r["offset"], tokens_hash(r["tokens"])))
    recorded = _recorded(attempts)
    assert sorted(recorded) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert dict(replayed[step]) == recorded[step], step
    assert {k[0] for k in recorded[6]} == {0} and {k[0] for k in recorded[7]} == {0, 1}

    # Logged loss of step k == loss of the step k-1 checkpoint on replay's sequences for step k (fp32).
    logged = {m["step"]: m["loss"] for m in read_metrics(run_dir) if "loss" in m}
    config = checkpoint_model_config(run_dir / "checkpoints" / "step_0000001")
    for step in range(2, STEPS + 1):
        model = MobiLlama(config)
        model.load_state_dict(read_full_model(run_dir / "checkpoints" / f"step_{step - 1:07d}"))
        tokens = torch.tensor([r["tokens"] for r in lines if r["step"] == step])
        with torch.no_grad():
            loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).item()
        assert abs(loss - logged[step]) < 1e-5, (step, loss, logged[step])

    # --find agrees with the forward listing for every sample; --mix sums to consumed_tokens.
    replay = RunReplay(run_dir)
    listed = defaultdict(list)
    for r in lines:
        listed[r["sample_index"]].append((r["step"], r["rank"], r["micro_batch"], r["offset"]))
    for sample in range(48):
        hits = replay.find(f"{token_shards}:{sample}")["consumed"]
        assert [(h["step"], h["rank"], h["micro_batch"], h["offset"]) for h in hits] == sorted(listed[sample])
    mix = json.loads(subprocess.run([sys.executable, "-m", "megamobi.replay", str(run_dir), "--mix", f"1:{STEPS}", "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    assert mix["tokens"] == read_manifest(run_dir / "checkpoints" / f"step_{STEPS:07d}")["consumed_tokens"] == STEPS * GB * SEQ
    table = subprocess.run([sys.executable, "-m", "megamobi.checkpoints", str(run_dir)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    shares = {n: e["share"] for n, e in mix["sources"].items()}
    assert f"c4 {100 * shares['c4']:.0f}%" in table[-1] and f"arxiv {100 * shares['arxiv']:.0f}%" in table[-1]
