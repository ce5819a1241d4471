"""The pretraining loop: a DeepSpeed engine over the (tensor/pipeline) parallel MobiLlama.

Per optimizer step: set the scheduled learning rate, run the global batch (micro-batches with
gradient accumulation, or DeepSpeed's pipeline schedule), refuse the step if anything is
non-finite, log one line, maybe validate, maybe checkpoint (every N tokens, or when SLURM warns
that time is up), and stop at the configured number of steps or tokens.
"""

from __future__ import annotations

import math
import signal
import socket
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from megamobi.checkpointing.commit import CheckpointNotSaved
from megamobi.checkpointing.manifest import read_manifest
from megamobi.checkpointing.model_files import read_full_model
from megamobi.checkpointing.recorded_paths import launch_dir_record
from megamobi.checkpointing.safe_deepspeed import use_safe_loading
from megamobi.checkpointing.writer import CheckpointWriter
from megamobi.config_io import ConfigError, to_dict
from megamobi.data.errors import ShardError
from megamobi.kernels.plan import apply_run_kernels
from megamobi.model import flops_per_token
from megamobi.parallel.build import build_parallel_model
from megamobi.parallel.groups import Layout, ParallelGroups
from megamobi.parallel.pipeline import sync_shared_ffn_replicas
from megamobi.parallel.shard_specs import load_full_state_dict
from megamobi.training.append_logs import truncate_metrics
from megamobi.training.checkpoint import (
    TrainerState,
    complete_checkpoints,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from megamobi.training.data_provenance import DataProvenance
from megamobi.training.data_stream import RunData
from megamobi.training.divergence import NonFiniteLossError, StepGuard
from megamobi.training.ds_config import build_ds_config
from megamobi.training.faults import FaultInjector, faults_from_env, warning_line
from megamobi.training.interval_health import IntervalHealth
from megamobi.training.metrics import MetricsLogger, memory_gb
from megamobi.training.optimizer import build_optimizer
from megamobi.training.portable_state import adam_step, load_portable_optimizer_state, write_portable_state
from megamobi.training.preflight import check_trainer_start
from megamobi.training.recovery import Recovery
from megamobi.training.resume_choice import prepare_run_dir
from megamobi.training.run_config import RunConfig
from megamobi.training.schedule import LrSchedule
from megamobi.training.schedule_checks import ScheduleRecord
from megamobi.training.schedule_table import schedule_lines
from megamobi.training.stragglers import StepTimes
from megamobi.training.watchdog import Heartbeat
from megamobi.version import code_version


class PreemptionFlag:
    """Set by SIGUSR1 (SLURM's `--signal=USR1@600` warning), SIGTERM or SIGINT (Ctrl-C, which
    megamobi.launcher passes on as it is); checked once per step. A SIGTERM or SIGINT also starts the
    heartbeat's stop grace (launch.stop_grace_s): a hung job ends instead of waiting. A second SIGINT
    interrupts at once."""

    def __init__(self, heartbeat: Heartbeat | None = None):
        self.signal_name: str | None = None
        self.heartbeat = heartbeat
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C twice: stop without saving
        self.signal_name = signal.Signals(signum).name
        if signum in (signal.SIGTERM, signal.SIGINT) and self.heartbeat is not None and self.heartbeat.sigterm_at is None:
            self.heartbeat.sigterm_at = time.monotonic()


def checkpoint_due(*, consumed_tokens_before: int, consumed_tokens_after: int, interval_tokens: int) -> bool:
    """True when this step crossed a multiple of interval_tokens (3.3B in the paper: every ~2014 steps
    at 800 x 2048 tokens a step, saved at the first step boundary at or past each multiple)."""
    if interval_tokens <= 0:
        return False
    return consumed_tokens_after // interval_tokens > consumed_tokens_before // interval_tokens


class Trainer:
    def __init__(self, run: RunConfig, *, data: RunData | None = None):
        self.run = run
        self.model_config = run.model_config
        world_size = dist.get_world_size()
        self.layout = Layout.for_world(world_size=world_size, tensor=run.parallel.tensor, pipeline=run.parallel.pipeline)
        self.groups = ParallelGroups(self.layout)
        self.run_dir = Path(run.run_dir)
        self.rank = dist.get_rank()
        self.total_steps = run.total_steps
        self.heartbeat = Heartbeat()  # where this rank is, for the hang watchdog
        self.preempted = PreemptionFlag(self.heartbeat)
        self.faults = FaultInjector(faults_from_env(), rank=self.rank)  # MEGAMOBI_FAULTS (tests and drills)
        self.guard = StepGuard()  # the step's loss and spike limit, for FiniteStepAdamW
        self.health = IntervalHealth()  # a checkpoint only of weights the steps since the last one vouch for
        self.stopped_by: str | None = None  # the signal that stopped the run early (after a save)
        self.last_checkpoint: Path | None = None
        self.checkpoint_writer = CheckpointWriter(  # checkpoint.async: written in a background thread
            background=run.checkpoint.async_save, report=lambda msg: print(f"[megamobi] rank {self.rank}: {msg}", flush=True))

        resume_from = self._find_resume_checkpoint()
        check_trainer_start(run, resume_from=resume_from)  # the checkpoint holds this model; the batch fits
        self.resumed_from = resume_from  # never pruned by checkpoint.keep_last
        # Refuses a resume onto other data (unless data.allow_change); records what each step trained on.
        self.data_provenance = DataProvenance(run, resume_from=resume_from, data_parallel_size=self.layout.data)
        # A wsd decay not yet begun may move on resume; other schedule changes involving wsd are refused.
        self.schedule_record = ScheduleRecord(run, resume_from=resume_from)
        self.lr_schedule = LrSchedule.of_run(run)
        saved_layout = read_manifest(resume_from).get("layout") if resume_from else None
        # Same layout: DeepSpeed restores its own files exactly. Any other layout (or a weights-only
        # checkpoint such as `convert from-hf` writes) goes through the plain-model files.
        reshard = resume_from is not None and saved_layout != self._layout_record()
        init_from = resume_from if reshard else None
        if resume_from is None and run.checkpoint.init_from:
            init_from = Path(run.checkpoint.init_from)

        built = build_parallel_model(self.model_config, self.groups, seed=run.train.seed,
                                     partition_method=run.parallel.partition_method,
                                     sequence_parallel=run.parallel.sequence_parallel,
                                     activation_checkpointing=self.model_config.activation_checkpointing)
        if init_from is not None:
            load_full_state_dict(built.module, self.groups, full_state_dict=read_full_model(init_from))
        self.kernels = apply_run_kernels(built, run)  # flash-attn / liger / chunked loss / compile; logged in train()
        self.is_pipeline = built.is_pipeline
        self._zero_loss = False
        self._windows: list[int] | None = None  # the training windows of the micro-batch in progress
        self.loss_fn = self._guarded_loss(built.loss_fn)
        ds_config = build_ds_config(run, world_size=world_size)
        for key, value in built.ds_config_overrides.items():
            ds_config[key] = {**ds_config.get(key, {}), **value}
        if self.is_pipeline:
            built.module.loss_fn = self.loss_fn
        self.optimizer = build_optimizer(built.module, run.optimizer)
        self.optimizer.guard = self.guard
        self.engine, _, _, _ = deepspeed.initialize(
            model=built.module, optimizer=self.optimizer, config=ds_config,
            mpu=None if self.is_pipeline else self.groups)
        use_safe_loading(self.engine)
        self.device = self.engine.device
        self.data = data or RunData(run)
        self.state = TrainerState()
        if resume_from is not None:
            self._resume(resume_from, saved_layout=saved_layout, reshard=reshard)
        else:
            if self.rank == 0:  # a fresh run: no log lines from an earlier attempt that saved nothing
                truncate_metrics(self.run_dir / "metrics.jsonl", after_step=0)
            if init_from is not None and self.rank == 0:
                print(f"[megamobi] initialised the model from {init_from} (weights only; fresh optimizer)", flush=True)
        self.logger = MetricsLogger(run_dir=self.run_dir, config=run.logging, enabled=self.rank == 0,
                                    total_steps=self.total_steps, run_name=self.run_dir.name,
                                    wandb_run_id=self.state.wandb_run_id, run_config=to_dict(run))
        self.state.wandb_run_id = self.logger.wandb_run_id or self.state.wandb_run_id
        self.data_provenance.log_changes(self.logger)
        self.schedule_record.log_changes(self.logger)
        self.flops_per_token = flops_per_token(self.model_config, seq_len=run.batch.seq_len)
        self.hosts = _gather_hosts()
        self.recovery = Recovery(self)  # divergence and replica-mismatch handling: rewind, re-run, verdicts
        if self.faults and self.rank == 0:
            print(f"[megamobi] {warning_line(self.faults.faults)}", file=sys.stderr, flush=True)

    def _layout_record(self) -> dict[str, int]:
        return {"tensor": self.layout.tensor, "pipeline": self.layout.pipeline, "data": self.layout.data,
                "zero_stage": self.run.parallel.zero_stage}

    # --- loss hooks -------------------------------------------------------------------------
    def _guarded_loss(self, loss_fn):
        """The model's loss, times 0 while priming a resharded optimizer; on training steps, as the
        injected faults make it (MEGAMOBI_FAULTS) and added to the step's guard (its spike check)."""

        def loss(logits, labels):
            value = loss_fn(logits, labels)
            if self._zero_loss:
                return value * 0.0
            if torch.is_grad_enabled():  # training steps only, never validation (which runs without grad)
                value = self.faults.loss(value, step=self.heartbeat.step, windows=self._windows)
                self.guard.add_loss(value)
            return value

        return loss

    # --- resume ------------------------------------------------------------------------------
    def _find_resume_checkpoint(self) -> Path | None:
        if not self.run.checkpoint.resume:
            if complete_checkpoints(self.run_dir):
                raise ConfigError(f"{self.run_dir} already holds checkpoints and checkpoint.resume is false: a new run "
                                  "would overwrite them. Use a new run_dir, or checkpoint.resume: true to continue.")
            return None
        # Every rank verifies a share of the checkpoint's bytes; none usable: exit 2, or a restart that
        # moves them aside (checkpoint.restart_from_scratch); torn last lines of the logs are cut off.
        return prepare_run_dir(self.run, report=lambda msg: print(f"[megamobi] {msg}", flush=True))

    def _resume(self, checkpoint: Path, *, saved_layout: dict | None, reshard: bool) -> None:
        if reshard:
            self.state = read_trainer_state(checkpoint)
            self._prime_optimizer_state()
            load_portable_optimizer_state(engine=self.engine, groups=self.groups, optimizer=self.optimizer,
                                          checkpoint_dir=checkpoint, step=self.state.adam_step)
        else:
            self.state = load_checkpoint(checkpoint, engine=self.engine)
        if self.is_pipeline:
            # Replicas are identical when saved; re-broadcast anyway so that a checkpoint edited or
            # converted by hand can never leave the stages training different FFNs.
            sync_shared_ffn_replicas(self.engine, self.groups)
        if self.rank == 0:
            # drop log lines of steps the restored checkpoint never saw: metrics.jsonl reads as if uninterrupted
            truncate_metrics(self.run_dir / "metrics.jsonl", after_step=self.state.step)
            how = f"resharded from layout {saved_layout}" if reshard else "same layout"
            print(f"[megamobi] resumed from {checkpoint} at step {self.state.step} ({self.state.consumed_samples} "
                  f"samples, {self.state.consumed_tokens} tokens; {how})", flush=True)

    def _prime_optimizer_state(self) -> None:
        """One step with zero loss and learning rate 0: DeepSpeed creates (and partitions) AdamW's
        state, and no weight moves (AdamW's update and decay are both scaled by lr = 0)."""
        self._set_lr(0.0)
        mb, seq = self.run.batch.micro_batch_size, self.run.batch.seq_len
        dummy = {"input_ids": torch.zeros(mb, seq, dtype=torch.long), "labels": torch.zeros(mb, seq, dtype=torch.long)}
        self._zero_loss = True
        try:
            self._train_step(iter([dummy] * self.engine.gradient_accumulation_steps()))
        finally:
            self._zero_loss = False

    # --- one optimizer step --------------------------------------------------------------------
    def _set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _train_step(self, batches) -> torch.Tensor:
        """The mean loss over the global batch, the same value on every rank."""
        self.optimizer.last_step_skipped = False  # DeepSpeed may skip a bad step before our guard runs
        self.optimizer.refusal = None
        if self.is_pipeline:
            pairs = ((b["input_ids"], b["labels"]) for b in batches)
            loss = self.engine.train_batch(data_iter=pairs)
            # DeepSpeed's pipeline engine returns the global mean loss on every rank.
            return loss.detach().float().reshape(1)
        total = torch.zeros(1, device=self.device)
        for _ in range(self.engine.gradient_accumulation_steps()):
            batch = next(batches)
            logits = self.engine(batch["input_ids"].to(self.engine.device))
            loss = self.loss_fn(logits, batch["labels"].to(self.engine.device))
            self.heartbeat.beat("backward")
            self.engine.backward(loss)
            self.heartbeat.beat("optimizer")
            self.engine.step()
            total += loss.detach().float()
        total /= self.engine.gradient_accumulation_steps()
        dist.all_reduce(total, group=self.groups.data_group)
        return total / self.layout.data

    def _watched(self, batches):
        """This rank's micro-batches of one step, with the heartbeat's data phase, the data-wait time
        (stragglers) and the windows the step trains on (skipped samples, poisoned data)."""
        started = time.perf_counter()
        for following, batch in enumerate(batches, start=1):
            self.step_times.add_data_wait(time.perf_counter() - started)
            windows = batch.pop("windows")
            self._windows = [(self.step_stage, w) for w in windows]
            self.step_windows.append(windows)
            yield batch
            self.heartbeat.beat("data", micro_batch=following)
            started = time.perf_counter()

    def train(self) -> TrainerState:
        run = self.run
        seq_len, gb = run.batch.seq_len, run.batch.global_batch_size
        self.logger.info(f"{self.model_config.name}: layout T={self.layout.tensor} P={self.layout.pipeline} "
                         f"D={self.layout.data}, ZeRO-{run.parallel.zero_stage}, {run.precision}, "
                         f"{self.total_steps} steps of {gb} x {seq_len} tokens, code {code_version()}")
        self.logger.info(self.kernels.describe())
        for line in schedule_lines(run):  # stages and lr: where each begins and ends (until_tokens rounded)
            self.logger.info(line)
        self.step_times = StepTimes(self.engine.module)  # forward and data-wait time, for stragglers
        self.step_windows: list[list[int]] = []  # this rank's micro-batches of the step in progress
        watchdog = self.recovery.start_watchdog()
        try:
            self._train_loop()
            self.wait_for_checkpoint()  # the run (or the signal's stop) ends with its last save complete
        finally:
            watchdog.stop()
        self.logger.info(f"pictures of this run: python -m megamobi.plot {self.run_dir}  (docs/eval.md)")
        self.logger.close()
        return self.state

    def _train_loop(self) -> None:
        run = self.run
        seq_len, gb = run.batch.seq_len, run.batch.global_batch_size
        bad_in_a_row, self.window_start, self.window_steps = 0, time.perf_counter(), 0
        while self.state.step < self.total_steps:
            state = self.state
            step = state.step + 1
            lr = self.lr_schedule(state.step)
            self._set_lr(lr)
            self.heartbeat.beat("data", step=step, micro_batch=0)
            self.faults.before_step(step)  # MEGAMOBI_FAULTS hang / kill
            where = self.data_provenance.next_step(step=step, consumed_samples=state.consumed_samples,
                                                   consumed_tokens=state.consumed_tokens)
            self.data_provenance.announce(where, logger=self.logger, windows=len(self.data.stages[where.stage.index].train))
            self.guard.reset(limit=self.recovery.spike_limit(), forced=self.recovery.forced_refusal(step))
            self.step_stage = where.stage.index
            self.step_windows.clear()
            batches = self.data.step_batches(where, dp_rank=self.groups.data_rank, dp_size=self.layout.data)
            loss = self._train_step(self._watched(batches)).item()
            self.recovery.after_first_run(step)  # MEGAMOBI_FAULTS poison: every rank learns the bad samples
            grad_norm = self.engine.get_global_grad_norm()
            grad_norm = None if grad_norm is None else float(grad_norm)
            refusal = self.optimizer.refusal
            if refusal is None and not math.isfinite(loss):
                refusal = "non-finite loss"
            elif refusal is None and grad_norm is not None and not math.isfinite(grad_norm):
                refusal = "non-finite gradient"  # DeepSpeed skipped the step before our guard ran
            skipped = refusal is not None
            self.faults.flip_after_update(step, self.recovery.flip_one_bit)
            tokens_before = state.consumed_tokens
            state.step += 1
            state.consumed_samples += gb
            state.consumed_tokens += gb * seq_len
            self.window_steps += 1
            if skipped:
                if self.recovery.on_bad_step(step, loss=loss, grad_norm=grad_norm, refusal=refusal) == "rewound":
                    continue
                state.skipped_steps += 1
                self.data_provenance.record_skip(step)
                if self.recovery.counts_toward_max_bad_steps(step):
                    bad_in_a_row += 1
                    self.logger.info(f"step {state.step}: {refusal} (loss {loss}, grad norm {grad_norm}): update "
                                     f"skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= run.train.max_bad_steps:
                        self.health.record(step, loss=loss, grad_norm=grad_norm)
                        self._stop(f"{bad_in_a_row} steps in a row were refused, train.max_bad_steps; the last: "
                                   f"{refusal}")
            else:
                bad_in_a_row = 0
                state.loss = loss
                self.recovery.on_good_step(step, loss=loss)
            cleared = self.health.record(step, loss=loss, grad_norm=grad_norm)
            if cleared:
                self.logger.info(cleared)
            if state.step % run.train.log_interval == 0 or state.step == self.total_steps or skipped:
                elapsed = time.perf_counter() - self.window_start
                self._log_step(loss=loss, lr=lr, grad_norm=grad_norm, step_time=elapsed / self.window_steps)
                self.window_start, self.window_steps = time.perf_counter(), 0
            if run.train.eval_interval and state.step % run.train.eval_interval == 0:
                self.heartbeat.beat("validation")
                self.validate()
            stop_signal = self._agreed_preemption()
            due = checkpoint_due(consumed_tokens_before=tokens_before, consumed_tokens_after=state.consumed_tokens,
                                 interval_tokens=run.checkpoint.interval_tokens)
            last = state.step == self.total_steps and run.checkpoint.save_final
            save = due or self.health.postponed or stop_signal or last
            if save and not self.health.healthy:  # weights in question: never written (interval_health.py)
                if stop_signal or last:
                    self._stop(f"{stop_signal} received" if stop_signal else "the run's last step")
                postponed = self.health.postpone(state.step)
                if postponed:
                    self.logger.info(postponed)
                save = False
            if self.recovery.check_replicas(step, before_save=bool(save)) == "rewound":
                continue  # a checkpoint is written only after the replicas agree
            if save:
                self.heartbeat.beat("save")
                self.save()
            if stop_signal:
                self.stopped_by = stop_signal
                self.logger.info(f"{stop_signal} received: saved a checkpoint at step {state.step}; "
                                 "re-run the same command to continue")
                break

    def _stop(self, why: str) -> None:
        """Collective: stop with exit 3, naming the newest healthy checkpoint (and, when the weights are in
        question, the first unhealthy step and which of its values was not finite)."""
        self.wait_for_checkpoint()  # a save in flight is published first: it may be the newest healthy one
        first = self.health.in_question
        newest = self.recovery.newest_healthy(first.step if first else self.state.step + 1)
        if first is not None:
            raise NonFiniteLossError(self.health.stop_message(step=self.state.step, newest_healthy=newest, why=why))
        where = (f"the newest healthy checkpoint is {newest}: run the same command to resume from it" if newest
                 else "no healthy checkpoint exists yet")
        raise NonFiniteLossError(f"stopped at step {self.state.step} ({why}). Lower optimizer.lr or check the data; {where}")

    def _agreed_preemption(self) -> str | None:
        """All ranks stop together if any rank was signalled (SLURM may signal only some). SIGTERM (a
        cancel) wins over SIGUSR1 (the time-limit warning, after which the job requeues itself); SIGINT
        (Ctrl-C) over both: neither requeues, and the log names what the user did. The same collective
        carries whether a background save failed (a full disk, a read-only mount): then every rank
        stops here with CheckpointNotSaved instead of training on what cannot be saved."""
        codes = {None: 0.0, "SIGUSR1": 1.0, "SIGTERM": 2.0, "SIGINT": 3.0}
        flag = torch.tensor([codes[self.preempted.signal_name], 1.0 if self.checkpoint_writer.failed else 0.0],
                            device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag[1].item():
            self.wait_for_checkpoint()  # raises CheckpointNotSaved on every rank
        return {1.0: "SIGUSR1", 2.0: "SIGTERM", 3.0: "SIGINT"}.get(flag[0].item())

    def _log_step(self, *, loss: float, lr: float, grad_norm: float | None, step_time: float) -> None:
        tokens_per_s = self.run.tokens_per_step / step_time / dist.get_world_size()
        tflops = self.flops_per_token * tokens_per_s / 1e12
        peak = self.run.logging.peak_tflops
        on_gpu = torch.cuda.is_available()
        memory = memory_gb()  # this rank's peak; the largest of all ranks too (pipeline stages differ)
        largest = torch.tensor([memory], device=self.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        record = {
            "step": self.state.step, "consumed_samples": self.state.consumed_samples,
            "consumed_tokens": self.state.consumed_tokens, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s * dist.get_world_size(), "tokens_per_s_per_device": tokens_per_s,
            "tflops_per_device": tflops if on_gpu else None,
            "mfu": tflops / peak if (on_gpu and peak) else None,
            "step_time_s": step_time, "memory_gb": memory, "memory_gb_max": largest.item(),
            "skipped_steps": self.state.skipped_steps,
        }
        stragglers = self.recovery.stragglers(steps=max(self.window_steps, 1))
        if stragglers:
            record["stragglers"] = stragglers
        self.logger.log(record)

    @torch.no_grad()
    def validate(self) -> float | None:
        if self.data.val is None:
            return None
        batches = list(self.data.val_batches(dp_rank=self.groups.data_rank, dp_size=self.layout.data))
        total, count = torch.zeros(1, device=self.device), torch.zeros(1, device=self.device)
        if self.is_pipeline:
            # The pipeline engine fixes activation shapes on first use: only whole micro-batches.
            batches = [b for b in batches if len(b["input_ids"]) == self.run.batch.micro_batch_size]
            pairs = iter([(b["input_ids"], b["labels"]) for b in batches])
            for b in batches:
                loss = self.engine.eval_batch(data_iter=pairs, num_micro_batches=1)
                total += float(loss) * len(b["input_ids"])
                count += len(b["input_ids"])
        else:
            self.engine.eval()
            for b in batches:
                logits = self.engine(b["input_ids"].to(self.engine.device))
                total += float(self.loss_fn(logits, b["labels"].to(self.engine.device))) * len(b["input_ids"])
                count += len(b["input_ids"])
            self.engine.train()
        dist.all_reduce(total, group=self.groups.data_group)
        dist.all_reduce(count, group=self.groups.data_group)
        val_loss = (total / count.clamp(min=1)).item()
        self.logger.log({"step": self.state.step, "consumed_samples": self.state.consumed_samples,
                         "consumed_tokens": self.state.consumed_tokens, "val_loss": val_loss,
                         "val_samples": int(count.item())})
        return val_loss

    # --- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        self.state.adam_step = adam_step(self.optimizer)
        path = save_checkpoint(
            run_dir=self.run_dir, engine=self.engine, state=self.state, model_config=self.model_config,
            write_portable_state=lambda directory, job: (write_portable_state(
                engine=self.engine, groups=self.groups, optimizer=self.optimizer, checkpoint_dir=directory, job=job),
                self.faults.during_save(self.state.step)),  # MEGAMOBI_FAULTS kill:...:during=save
            keep_last=self.run.checkpoint.keep_last, protect=(self.resumed_from,), writer=self.checkpoint_writer,
            manifest_info={
                "step": self.state.step, "consumed_samples": self.state.consumed_samples,
                "consumed_tokens": self.state.consumed_tokens,
                **self.health.manifest_info(),  # the loss and gradient norm of this checkpoint's own last step
                "layout": self._layout_record(),
                "precision": self.run.precision, "run_config": to_dict(self.run),
                "data_manifests": self.data.manifest_checksums(),
                "data_fingerprints": self.data.fingerprints,  # shard sizes + sampled blocks, compared on resume
                **launch_dir_record(),  # relative data.paths resolve from it (megamobi.replay, eval, convert)
                **self.data_provenance.manifest_info(
                    step=self.state.step, consumed_tokens=self.state.consumed_tokens,
                    end_tokens=self.state.consumed_tokens + (self.total_steps - self.state.step) * self.run.tokens_per_step),
                **self.schedule_record.manifest_info(),
            })
        self.logger.info(f"saving checkpoint {path} in the background" if self.checkpoint_writer.background
                         else f"saved checkpoint {path}")
        self.last_checkpoint = path
        self.health.reset()
        self.recovery.saved(self.state.step)
        self._check_shard_sizes()
        return path

    def _check_shard_sizes(self) -> None:
        """Collective, at each checkpoint: a shard cut shorter than its index since the start stops the
        run now, by name, once the checkpoint just saved is complete (every sample read so far was
        whole: a short read is a ShardError of its own, megamobi.data.shard_reader)."""
        from megamobi.data.shard_reader import shards_shorter_than_index
        from megamobi.data.stages import all_paths
        from megamobi.training.checkpoint import from_rank0

        problems = from_rank0(shards_shorter_than_index(all_paths(self.run.data_stages)) if self.rank == 0 else None)
        if problems:
            self.wait_for_checkpoint()
            raise ShardError("; ".join(problems))

    def wait_for_checkpoint(self) -> None:
        """Collective: the last save is complete, published on every rank's word, or this raises
        CheckpointNotSaved (on every rank: megamobi.pretrain ends with the reason, exit status 74)."""
        failed = self.checkpoint_writer.wait()
        if self.checkpoint_writer.background and self.last_checkpoint is not None:
            anyone = torch.tensor([0.0 if failed is None else 1.0], device=self.device)
            dist.all_reduce(anyone, op=dist.ReduceOp.MAX)  # also: rank 0 has published it
            if anyone.item() and failed is None:
                failed = CheckpointNotSaved(f"checkpoint {self.last_checkpoint.name} NOT saved: another rank could "
                                            "not write its part (it says why)")
            if failed is None:
                self.logger.info(f"saved checkpoint {self.last_checkpoint}")
        if isinstance(failed, CheckpointNotSaved):
            raise failed
        if failed is not None:
            raise CheckpointNotSaved(f"the last checkpoint ({self.last_checkpoint}) was not saved: {failed}") from failed


def _gather_hosts() -> list[str]:
    """Every rank's host name, by rank (collective; once per launch): how events name ranks."""
    hosts: list[str] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts

