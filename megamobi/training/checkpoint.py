"""Saving and resuming a run: atomic checkpoint directories, the `latest` pointer, and falling back
past checkpoints that are incomplete or fail their checksums.

    RUN_DIR/checkpoints/
      step_0000200/
        deepspeed/state/...          DeepSpeed's model + optimizer files (every ZeRO partition)
        model/tp00-pp00.safetensors  layout-independent fp32 weights  } megamobi.training.portable_state
        optimizer/tp00-pp00.safetensors  ... and AdamW moments        }
        rng/rank00000.json           each rank's RNG state
        trainer_state.json           step, consumed samples/tokens, logging run id, ...
        megamobi.json                manifest + sha256 of every file above; written last
      latest                         "step_0000200", replaced atomically after the manifest

Every rank writes its files into `.step_0000200.partial/`, hashing them as they are written
(megamobi.checkpointing.checkpoint_job), and reports their digests; rank 0 writes the manifest,
fsyncs, renames the directory and moves `latest` (megamobi.checkpointing.commit), so a directory
named step_* is complete unless its files were changed later, which the checksums catch. With
`checkpoint.async: true` the writing happens in a background thread (megamobi.checkpointing.writer).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megamobi.checkpointing.commit import (
    LATEST,
    CheckpointNotSaved,
    gather_rank_digests,
    publish_checkpoint,
    report_rank_done,
)
from megamobi.checkpointing.manifest import (
    CHECKPOINTS,
    complete_checkpoints,
    manifest_damage,
    read_manifest,
    verify_checkpoint,
)
from megamobi.checkpointing.storage import describe_write_error
from megamobi.checkpointing.writer import CheckpointWriter
from megamobi.model_config import ModelConfig
from megamobi.training import interval_health
from megamobi.training.early_stop import slow_save_for_tests

DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken (skipped ones included: they consumed their data)
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    loss: float | None = None
    wandb_run_id: str | None = None
    adam_step: int = 0  # AdamW's own step count (skipped steps do not advance it)
    # The losses of the last train.divergence.window applied steps: the spike detector's median, so that
    # a resume or rewind judges the next steps exactly as an uninterrupted run would.
    recent_losses: list[float] = field(default_factory=list)


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def find_resume_checkpoint(run_dir: str | Path, *, report, skipped: list | None = None) -> Path | None:
    """The newest checkpoint that passes its checksums; broken ones are reported (by rank 0) and
    skipped (and added to `skipped` as (checkpoint, problems)). Collective when torch.distributed is
    up: the ranks verify a share of the bytes each."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    candidates = from_rank0(complete_checkpoints(run_dir) if rank == 0 else None)
    for candidate in reversed(candidates):
        problems = verify_checkpoint_across_ranks(candidate)
        if not problems:
            return candidate
        if rank == 0:
            report(f"skipping checkpoint {candidate}: " + "; ".join(problems[:3]))
        if skipped is not None:
            skipped.append((candidate, problems))
    for partial in checkpoints_dir(run_dir).glob(".step_*.partial") if rank == 0 and checkpoints_dir(run_dir).is_dir() else []:
        report(f"ignoring incomplete checkpoint {partial} (the run stopped while writing it)")
    return None


def verify_checkpoint_across_ranks(checkpoint: Path) -> list[str]:
    """verify_checkpoint() with the files shared out over the ranks (balanced by bytes), every
    rank's problems gathered: the same answer on every rank. One process: verify_checkpoint()."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify_checkpoint(checkpoint)
    rank, world = dist.get_rank(), dist.get_world_size()
    readable = None
    if rank == 0:  # one reader of the manifest decides whether there is anything to share out
        try:
            readable = manifest_damage(read_manifest(checkpoint)) is None
        except (OSError, ValueError):
            readable = False
    if not from_rank0(readable):
        return from_rank0(verify_checkpoint(checkpoint) if rank == 0 else None)
    mine = verify_checkpoint(checkpoint, share=(rank, world))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return [problem for problems in everyone for problem in problems]


def from_rank0(value):
    """Rank 0's value (any picklable object: a decision, a path), on every rank."""
    box = [value]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(*, run_dir: Path, engine, state: TrainerState, model_config: ModelConfig,
                    write_portable_state, manifest_info: dict[str, Any], keep_last: int | None,
                    protect: tuple[Path | None, ...] = (), writer: CheckpointWriter | None = None) -> Path:
    """Collective: every rank calls it. `write_portable_state(dir, job)` adds the layout-independent
    files to this rank's job. The files are hashed while written and published by rank 0 once every
    rank reported (megamobi.checkpointing.commit); with a background `writer` this returns as soon
    as the state is copied, otherwise once the checkpoint is published. A save that fails (this one,
    or the background save before it) raises CheckpointNotSaved on every rank, its partial directory
    removed and `latest` unchanged."""
    writer = writer or CheckpointWriter(background=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    name = checkpoint_name(state.step)
    root = checkpoints_dir(run_dir)
    final, partial = root / name, root / f".{name}.partial"
    # A save waits for the one before it (it may prune, or even be of the same step); if that one failed,
    # every rank stops here rather than train on what could not be saved.
    agree_saved(writer.wait(), root=root, name="the previous checkpoint")
    started = None
    if rank == 0:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        except OSError as err:  # a read-only or full file system: nothing written, nothing to remove
            started = CheckpointNotSaved(not_saved_line(name, reason=_in_words(err, root=root), root=root))
    agree_saved(started, root=root, name=name)  # also the barrier: the partial directory exists for every rank
    job = writer.new_job(partial)
    engine.checkpoint_engine.job = job  # DeepSpeed's state dicts go into the job (safe_deepspeed)
    try:
        engine.save_checkpoint(str(partial / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False)
    finally:
        engine.checkpoint_engine.job = None
    if rank == 0:
        drop_deepspeed_recovery_scripts(partial / DEEPSPEED_DIR)
    write_portable_state(partial, job)
    job.add_json(partial / "rng" / f"rank{rank:05d}.json", rng_state())
    if rank == 0:
        job.add_json(partial / TRAINER_STATE, dict(state.__dict__))

    def write_and_publish() -> None:
        failed, reason, reported = None, None, True
        try:
            files = job.write(verify=writer.background)
            slow_save_for_tests()  # MEGAMOBI_TEST_SAVE_DELAY_S: a signal or a kill can arrive mid-save
            report_rank_done(partial, rank=rank, files=files)
        except Exception as err:
            failed = err
            # In words before the rank's files go (the free space is what the writer met).
            reason = _in_words(err, root=root)
            job.discard()  # a full disk gets its space back, so the report below can be written
            try:
                report_rank_done(partial, rank=rank, files=None, error=reason)
            except OSError:  # read-only by now: rank 0 notices that itself (gather_rank_digests)
                reported = False
        if rank == 0:
            try:
                if not reported:  # rank 0's own report is missing: waiting for it would never end
                    raise CheckpointNotSaved(f"rank 0: {reason}")
                digests = gather_rank_digests(partial, world_size=world_size)  # every rank, rank 0 too
                publish_checkpoint(partial, final, model_config=model_config, info=manifest_info, digests=digests)
            except Exception as err:
                shutil.rmtree(partial, ignore_errors=True)
                why = str(err) if isinstance(err, CheckpointNotSaved) else _in_words(err, root=root)
                raise CheckpointNotSaved(not_saved_line(name, reason=why, root=root, partial=partial)) from None
            prune_checkpoints(run_dir, keep_last=keep_last, protect=(final, *protect), newest_healthy=final)
            if writer.background:
                writer.report(f"saved checkpoint {final} (written in the background)")
        if failed is not None:
            raise CheckpointNotSaved(not_saved_line(name, reason=f"rank {rank}: {reason}", root=root)) from failed

    try:
        writer.submit(write_and_publish, what=name)
    except CheckpointNotSaved as err:  # a synchronous save: every rank learns of it below
        agree_saved(err, root=root, name=name)
    if not writer.background:
        agree_saved(None, root=root, name=name)
    return final


def _in_words(err: BaseException, *, root: Path) -> str:
    """Why a checkpoint write failed: "disk full ..." / "permission denied ..." with the path and free
    space, or the error itself."""
    return describe_write_error(err, directory=root) or f"{type(err).__name__}: {err}"


def not_saved_line(name: str, *, reason: str, root: Path, partial: Path | None = None) -> str:
    """`partial`: rank 0's word on the partial directory (removed, or left where it cannot be)."""
    latest = root / LATEST
    previous = latest.read_text().strip() if latest.is_file() else None
    kept = (f"`latest` still names {previous}, which the same command resumes from" if previous
            else "there is no earlier checkpoint: the same command starts from step 0")
    left = "" if partial is None else (f" {partial} could not be removed (a resume ignores it)." if partial.exists()
                                       else " Its partial directory was removed.")
    return f"checkpoint {name} NOT saved: {reason}.{left} {kept} once the file system has room and is writable"


def agree_saved(failure: BaseException | None, *, root: Path, name: str) -> None:
    """Collective: raise CheckpointNotSaved on every rank if any rank's save failed (the rank that
    failed says why; rank 0, which gathers every rank's report, says it for all)."""
    anyone = failure is not None
    if dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if anyone else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone = bool(flag.item())
    if not anyone:
        return
    if isinstance(failure, CheckpointNotSaved):
        raise failure
    if failure is not None:
        raise CheckpointNotSaved(str(failure)) from failure
    raise CheckpointNotSaved(f"checkpoint {name} NOT saved: another rank could not write its part (it says why); "
                             f"the newest checkpoint in {root} is intact")


# DeepSpeed copies these into every checkpoint it saves. They cannot read ours: zero_to_fp32.py fails
# as soon as T > 1 ("Expected 8 of '*_optim_states.pt' ... but found 16"), and neither knows megamobi's
# shared FFN or layouts. Our own files are the way out (docs/convert.md: megamobi.convert, read_full_model).
DEEPSPEED_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def drop_deepspeed_recovery_scripts(deepspeed_dir: Path) -> None:
    """Remove DeepSpeed's recovery scripts (rank 0 copies them during save_checkpoint) before the manifest."""
    for script in DEEPSPEED_RECOVERY_SCRIPTS:  # not copied at all since use_safe_loading(); kept for safety
        try:
            (deepspeed_dir / script).unlink(missing_ok=True)
        except OSError:  # a read-only file system says so even of a missing file: the write fails later
            pass


def prune_checkpoints(run_dir: Path, *, keep_last: int | None, protect: tuple[Path | None, ...],
                      newest_healthy: Path | None = None) -> list[Path]:
    """Delete the checkpoints keep_last says to (megamobi.training.interval_health): only older than the
    newest healthy one (the one just saved; by default the one `latest` names), never it, never one in
    `protect` (the one this run resumed from), and only healthy ones whose checksums pass: a newer, broken
    or unhealthy checkpoint left by an earlier attempt is neither counted nor deleted. None keeps everything."""
    if keep_last is None:
        return []
    if keep_last < 1:  # refused by the run config's validation; never "delete everything"
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    if newest_healthy is None:
        latest = checkpoints_dir(run_dir) / "latest"
        if not latest.is_file():
            return []
        newest_healthy = checkpoints_dir(run_dir) / latest.read_text().strip()
    return interval_health.prune(complete_checkpoints(run_dir), newest_healthy=Path(newest_healthy), keep_last=keep_last,
                                 protect={Path(p).resolve() for p in protect if p is not None})


def load_checkpoint(checkpoint: Path, *, engine) -> TrainerState:
    """Collective: restore engine (model, optimizer), trainer state and this rank's RNG."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    engine.load_checkpoint(str(checkpoint / DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                           load_optimizer_states=True, load_lr_scheduler_states=False)
    state = read_trainer_state(checkpoint)
    rng_file = checkpoint / "rng" / f"rank{rank:05d}.json"
    if rng_file.is_file():  # absent when resuming on more ranks than saved (resharding)
        set_rng_state(json.loads(rng_file.read_text()))
    return state


def read_trainer_state(checkpoint: Path) -> TrainerState:
    return TrainerState(**json.loads((checkpoint / TRAINER_STATE).read_text()))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
