"""Detect and recover by itself: the closed loop around the training loop (docs/reliability.md).

- A bad step (non-finite loss or gradient norm, or a loss spike; megamobi/training/divergence.py) is
  skipped, stops the run, or (train.divergence.action: rewind) rewinds to the newest healthy checkpoint
  and re-runs up to it. Training is bitwise deterministic, so the re-run either reproduces the bad step
  (bad data: that step's samples, every rank's micro-batches, are skipped and recorded in the
  checkpoints' data provenance, which megamobi.replay shows) or does not (a transient fault: recorded
  with its ranks and hosts, training goes on). The re-run's losses are compared with the first pass's.
- Every train.consistency_check_interval steps, and before every save, the replicas of every
  replicated tensor are compared (megamobi/training/consistency.py); a mismatch rewinds the same way,
  and the re-run names the rank whose copy was corrupted when there is no majority.
- Stragglers are named every log_interval steps (megamobi/training/stragglers.py); the hang watchdog
  runs beside the loop (megamobi/training/watchdog.py).

After train.divergence.max_rewinds rewinds in one launch the run stops (exit 3), saying why. Every
decision is an event in RUN_DIR/events.jsonl and one log line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megamobi.checkpointing.manifest import complete_checkpoints, read_manifest
from megamobi.parallel.pipeline import sync_shared_ffn_replicas
from megamobi.training.checkpoint import from_rank0, load_checkpoint
from megamobi.training.consistency import ReplicaCheck, flip_one_bit
from megamobi.training.data_provenance import DataProvenance
from megamobi.training.divergence import LossWindow, NonFiniteLossError, newest_healthy_checkpoint
from megamobi.training.events import append_event, who
from megamobi.training.stragglers import describe, find_stragglers, gather_step_times
from megamobi.training.watchdog import Watchdog, WatchdogConfig

if TYPE_CHECKING:
    from megamobi.training.loop import Trainer


@dataclasses.dataclass
class Suspect:
    """A bad step being re-run: does it happen again?"""

    step: int
    kind: str  # non_finite | spike | replica_mismatch
    ranks: list[int]
    detail: dict[str, Any]


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


class Recovery:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.config = trainer.run.train.divergence
        self.window = LossWindow(self.config, trainer.state.recent_losses)
        self.rewinds = 0
        self.suspect: Suspect | None = None
        self.data_steps: set[int] = set()  # steps whose re-run reproduced the fault: bad data, always skipped
        self.first_pass: dict[int, float] = {}  # losses since the newest checkpoint: a re-run must repeat them
        interval = trainer.run.train.consistency_check_interval
        flips = any(f.kind == "flip" for f in trainer.faults.faults)
        self.replica_check = (ReplicaCheck(trainer.engine, trainer.groups, zero_stage=trainer.run.parallel.zero_stage)
                              if interval or flips else None)  # collective: same condition on every rank
        if interval and self.replica_check is not None and not self.replica_check.enabled:
            trainer.logger.info("train.consistency_check_interval: off under ZeRO-3 (its parameters are partitioned, "
                                "not replicated)")
        self.attempt = self._agree_on_attempt()

    # --- set-up ---------------------------------------------------------------------------------
    def _agree_on_attempt(self) -> str:
        """One name for this launch on every rank (its hang report folder)."""
        box = [time.strftime("%Y%m%d-%H%M%S") + (f"-job{os.environ['SLURM_JOB_ID']}" if os.environ.get("SLURM_JOB_ID")
                                                   else f"-pid{os.getpid()}")]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def after_first_run(self, step: int) -> None:
        """MEGAMOBI_FAULTS `poison`: after the first run of a poisoned step, every rank learns the samples
        it poisoned, which then give a NaN loss wherever they are trained on (collective on that step)."""
        t = self.trainer
        faults = [f for f in t.faults.faults if f.kind == "poison" and f.step == step]
        if not faults or t.faults.runs_of_step.get(step) != 1:
            return
        poisoned_here = any(f.rank == t.rank for f in faults)
        mine = [(t.step_stage, w) for windows in t.step_windows for w in windows] if poisoned_here else []
        everyone: list[list] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
        t.faults.poisoned_windows.update(tuple(w) for part in everyone for w in part)

    def start_watchdog(self) -> Watchdog:
        """The hang watchdog thread, and the heartbeat's forward phase (+ the `slow` fault) on the model."""
        t = self.trainer
        from megamobi.training.launch_config import requeue_enabled

        launch = t.run.launch

        def forward_started(module, args):
            if torch.is_grad_enabled():
                t.heartbeat.beat("forward")
                t.faults.forward_delay(t.heartbeat.step)

        def forward_done(module, args, output):
            if torch.is_grad_enabled():
                t.heartbeat.beat("backward")

        t.engine.module.register_forward_pre_hook(forward_started)
        t.engine.module.register_forward_hook(forward_done)
        config = WatchdogConfig(run_dir=t.run_dir, rank=t.rank, world_size=dist.get_world_size(), host=t.hosts[t.rank],
                                attempt=self.attempt, hang_timeout_s=launch.hang_timeout_s,
                                stop_grace_s=launch.stop_grace_s, requeue=requeue_enabled(launch))

        def newest() -> str | None:
            found = complete_checkpoints(t.run_dir)
            return str(found[-1]) if found else None

        watchdog = Watchdog(config, t.heartbeat, newest_checkpoint=newest)
        watchdog.start()
        return watchdog

    # --- events ---------------------------------------------------------------------------------
    def _event(self, record: dict[str, Any], line: str | None) -> None:
        """One line in RUN_DIR/events.jsonl (rank 0) and, unless the loop says it itself, in the log."""
        t = self.trainer
        if t.rank == 0:
            ranks = record.get("ranks", [])
            append_event(t.run_dir, {"step": record.pop("step"), "kind": record.pop("kind"), "ranks": ranks,
                                     "hosts": [t.hosts[r] for r in ranks], **record})
        if line:
            t.logger.info(line)

    def _who(self, ranks: list[int]) -> str:
        return who(ranks, self.trainer.hosts)

    # --- divergence -----------------------------------------------------------------------------
    def spike_limit(self) -> float:
        return self.window.limit()

    def forced_refusal(self, step: int) -> str | None:
        return "bad data (its re-run reproduced the fault)" if step in self.data_steps else None

    def counts_toward_max_bad_steps(self, step: int) -> bool:
        """Skipped bad data is a decision, not a failure in a row."""
        return step not in self.data_steps

    def _bad_ranks(self, kind: str) -> list[int]:
        """The ranks whose own micro-batch losses were non-finite (or above the spike limit)."""
        mean = self.trainer.guard.local_mean()
        mine = torch.tensor([0.0 if mean is None else mean, 0.0 if mean is None else 1.0], dtype=torch.float64,
                            device=self.trainer.device)
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(everyone, mine)
        if kind == "spike":
            limit = self.trainer.guard.limit
            return [r for r, (value, has) in enumerate(v.tolist() for v in everyone) if has and value > limit]
        return [r for r, (value, has) in enumerate(v.tolist() for v in everyone) if has and not math.isfinite(value)]

    def _step_samples(self) -> list[dict]:
        """Every rank's micro-batches of the step just run: data-parallel rank, micro-batch, shard, row, offset."""
        t = self.trainer
        mine = [{"rank": t.groups.data_rank, "micro_batch": i, **origin}
                for i, windows in enumerate(t.step_windows) for origin in t.data.window_origins(t.step_stage, windows)]
        everyone: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(everyone, mine)
        unique = {tuple(sorted(s.items())): s for part in everyone for s in part}
        return sorted(unique.values(), key=lambda s: (s["rank"], s["micro_batch"], s["shard"], s["row"], s["offset"]))

    def on_bad_step(self, step: int, *, loss: float, grad_norm: float | None, refusal: str | None) -> str:
        """Collective (every rank sees the same bad step). 'rewound', or 'skipped' (the update was refused
        and the step's samples count as not trained on); raises NonFiniteLossError to stop."""
        if step in self.data_steps:
            self.trainer.logger.info(f"step {step}: skipped: {self.forced_refusal(step)}")
            return "skipped"
        kind = "spike" if refusal and refusal.startswith("loss spike") else "non_finite"
        ranks = self._bad_ranks(kind)
        detail = {"loss": _finite(loss), "grad_norm": _finite(grad_norm), "reason": refusal or "non-finite gradient"}
        what = f"step {step}: {detail['reason']} (loss {loss}, grad norm {grad_norm}) on {self._who(ranks)}"
        suspect = self.suspect
        if suspect is not None and suspect.step == step and suspect.kind in ("non_finite", "spike"):
            self.suspect = None
            self.data_steps.add(step)
            samples = self._step_samples()
            self._event({"step": step, "kind": "data", "ranks": ranks, "samples": samples, "first": suspect.detail,
                         "action": "skipped the step's samples", **detail},
                        f"{what} again after the rewind: bad data; skipped its {len(samples)} samples "
                        f"(events.jsonl has them; megamobi.replay shows them as skipped) and carrying on")
            return "skipped"
        action = self.config.action
        if action == "skip":  # the loop logs the line, with the count of bad steps in a row
            self._event({"step": step, "kind": kind, "ranks": ranks, "action": "update skipped", **detail}, None)
            return "skipped"
        if action == "stop":
            newest = self.newest_healthy(step)
            self._event({"step": step, "kind": kind, "ranks": ranks, "action": "stopped", **detail}, f"{what}: stopping")
            raise NonFiniteLossError(
                f"{what}; the update was not applied. Stopped (train.divergence.action: stop); "
                + (f"the newest healthy checkpoint is {newest}: run the same command to resume from it, "
                   if newest else "no healthy checkpoint exists yet; ")
                + "or set train.divergence.action: rewind to re-run and skip bad data by itself")
        self._rewind(step, suspect=Suspect(step, kind, ranks, detail), why=what,
                     record={"step": step, "kind": kind, "ranks": ranks, **detail})
        return "rewound"

    def on_good_step(self, step: int, *, loss: float) -> None:
        t = self.trainer
        self.window.add(loss)
        t.state.recent_losses = list(self.window.losses)
        if step in self.first_pass and self.first_pass[step] != loss:
            self._event({"step": step, "kind": "rerun_mismatch", "ranks": [], "first_pass_loss": self.first_pass[step],
                         "rerun_loss": loss, "action": "carried on with the re-run"},
                        f"step {step}: the re-run's loss {loss!r} differs from the first pass's "
                        f"{self.first_pass[step]!r}: not bitwise deterministic (a hardware fault before the rewind?)")
        self.first_pass[step] = loss
        suspect = self.suspect
        if suspect is not None and suspect.step == step and suspect.kind in ("non_finite", "spike"):
            self.suspect = None
            self._event({"step": step, "kind": "transient", "ranks": suspect.ranks, "first": suspect.detail,
                         "action": "carried on"},
                        f"step {step} re-ran cleanly (loss {loss:.4f}): the {suspect.detail['reason']} on "
                        f"{self._who(suspect.ranks)} was transient (a possible hardware fault); carrying on")

    def saved(self, step: int) -> None:
        self.first_pass = {k: v for k, v in self.first_pass.items() if k > step}

    # --- replicas -------------------------------------------------------------------------------
    def flip_one_bit(self) -> None:
        target = self.replica_check.flip_target() if self.replica_check is not None else None
        if target is not None:
            flip_one_bit(target[1])

    def check_replicas(self, step: int, *, before_save: bool) -> str | None:
        """Collective. 'rewound' after a mismatch; raises NonFiniteLossError when a re-run reproduces it."""
        interval = self.trainer.run.train.consistency_check_interval
        check = self.replica_check
        if not interval or check is None or not check.enabled or not (step % interval == 0 or before_save):
            return None
        mismatch = check.check(step=step)
        suspect = self.suspect
        rerun = suspect is not None and suspect.kind == "replica_mismatch" and suspect.step == step
        if mismatch is None:
            if rerun:
                self.suspect = None
                changed = check.changed_since_first_pass()
                self._event({"step": step, "kind": "transient", "ranks": changed, "first": suspect.detail,
                             "action": "carried on"},
                            f"step {step}: the replicas agree after the re-run: the copies on {self._who(changed)} were "
                            "corrupted (they differ from their own re-run); carrying on")
            return None
        named = self._who(mismatch.ranks)
        tensors = ", ".join(mismatch.tensors[:5]) + (f" and {len(mismatch.tensors) - 5} more" if len(mismatch.tensors) > 5 else "")
        majority = "differ from the majority" if mismatch.majority else "disagree (no majority: two copies)"
        detail = {"tensors": mismatch.tensors, "majority": mismatch.majority}
        what = f"step {step}: replicas of {tensors} differ: {named} {majority}"
        if rerun:
            self.suspect = None
            self._event({"step": step, "kind": "reproducible", "ranks": mismatch.ranks, **detail,
                         "action": "stopped"}, f"{what}, again after the re-run")
            raise NonFiniteLossError(f"{what}, again after re-running from the newest healthy checkpoint: not a "
                                     "transient fault (a device that corrupts data every time, or a nondeterministic bug)")
        self._rewind(step, suspect=Suspect(step, "replica_mismatch", mismatch.ranks, detail), why=what,
                     record={"step": step, "kind": "replica_mismatch", "ranks": mismatch.ranks, **detail})
        return "rewound"

    # --- rewind ---------------------------------------------------------------------------------
    def newest_healthy(self, step: int):
        """Collective: rank 0's newest healthy checkpoint before `step` (its manifest's health record), on every rank."""
        t = self.trainer
        found = newest_healthy_checkpoint(t.run_dir, before_step=step) if t.rank == 0 else None
        return from_rank0(found)

    def _rewind(self, step: int, *, suspect: Suspect, why: str, record: dict[str, Any]) -> None:
        """Collective: restore the newest healthy checkpoint before `step` and continue from it."""
        t = self.trainer
        t.wait_for_checkpoint()  # a background save still in flight is published (or refused) first
        limit = self.config.max_rewinds
        if self.rewinds >= limit:
            self._event({**record, "action": "stopped (max_rewinds)"}, f"{why}: stopping")
            raise NonFiniteLossError(f"{why}; this run already rewound {self.rewinds} time(s) (train.divergence."
                                     f"max_rewinds {limit}): stopping. Read {t.run_dir}/events.jsonl; the newest "
                                     "healthy checkpoint is intact: run the same command to resume from it")
        target = self.newest_healthy(step)
        if target is None:
            self._event({**record, "action": "stopped (no healthy checkpoint)"}, f"{why}: stopping")
            raise NonFiniteLossError(f"{why}; no healthy checkpoint before step {step} to rewind to (save more often: "
                                     "checkpoint.interval_tokens)")
        layout = read_manifest(target).get("layout")
        if layout != t._layout_record():
            self._event({**record, "action": "stopped (checkpoint of another layout)"}, f"{why}: stopping")
            raise NonFiniteLossError(f"{why}; the newest healthy checkpoint {target} has layout {layout}, not this run's: "
                                     "run the same command to resume from it (resharding happens at start)")
        self.rewinds += 1
        self._event({**record, "action": f"rewind to {target.name}"},
                    f"{why}: rewinding to {target} (rewind {self.rewinds} of at most {limit}) to re-run step {step}")
        t.state = load_checkpoint(target, engine=t.engine)
        t.health.reset()  # the weights are the healthy checkpoint's; the re-run steps are judged afresh
        if t.is_pipeline:
            sync_shared_ffn_replicas(t.engine, t.groups)
        t.data_provenance = DataProvenance(t.run, resume_from=target, data_parallel_size=t.layout.data)
        self.window = LossWindow(self.config, t.state.recent_losses)
        self.suspect = suspect
        t.step_times.take()  # the abandoned steps' times say nothing about stragglers
        t.window_start, t.window_steps = time.perf_counter(), 0
        if t.rank == 0:
            from megamobi.training.append_logs import truncate_metrics

            truncate_metrics(t.run_dir / "metrics.jsonl", after_step=t.state.step)

    # --- stragglers -----------------------------------------------------------------------------
    def stragglers(self, *, steps: int) -> list[dict]:
        """Collective, every logging step: the ranks slower than train.straggler_ratio x their peers' median."""
        t = self.trainer
        times = gather_step_times(t.step_times, steps=steps, device=t.device)
        stage_of = [t.layout.coordinates(r)[2] for r in range(dist.get_world_size())]
        named = find_stragglers(times, stage_of=stage_of, ratio=t.run.train.straggler_ratio)
        for entry in named:
            entry["host"] = t.hosts[entry["rank"]]
        if named:
            t.logger.info(f"stragglers at step {t.state.step}: {describe(named, t.hosts)}")
        return named
