"""Pretraining entry point.

    deepspeed --num_gpus 8 --module megamobi.pretrain --config RUN.yaml [key.sub=value ...]
    torchrun --nproc_per_node 2 -m megamobi.pretrain --config RUN.yaml
    launch/pretrain.sh RUN.yaml [overrides]          (SLURM or one machine; see docs/launch.md)

The run config is loaded and validated against the world size before any process group exists,
so an impossible setting fails in a second with a message that says what to change.
"""

from __future__ import annotations

import argparse
import os
import sys

from megamobi.config_io import ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m megamobi.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's YAML file, e.g. configs/pretrain-tiny-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the run config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed passes it
    parser.add_argument("--check-only", action="store_true", help="validate the config for WORLD_SIZE and exit")
    parser.add_argument("--verify-shards", action="store_true",
                        help="hash every byte of every shard against its manifest.json sha256 before training "
                             "(each rank a share; --check-only: all, in one process); see docs/training.md")
    return parser.parse_args(argv)


def quiet_known_noise() -> None:
    """Silence messages about choices megamobi makes on purpose, so the log shows what matters."""
    import logging
    import warnings

    # DeepSpeed's own collectives use the old name; nothing for users to act on.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    # DeepSpeed's CPU pipeline p2p broadcasts inside autograd; the gradients are correct (tested).
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    from deepspeed.utils import logger as ds_logger

    # We pass torch's AdamW to ZeRO deliberately (tested against single-process training).
    ds_logger.addFilter(lambda record: "untested optimizer" not in record.getMessage())
    ds_logger.setLevel(max(ds_logger.level, logging.WARNING))


def already_complete(run, *, newest) -> str | None:
    """The one line for a relaunch of a finished run (`newest`, the checkpoint a start would resume
    from, holds the last step, all its files present at their recorded sizes; with --check-only its
    checksums were checked too), or None when there is training left to do."""
    from pathlib import Path

    from megamobi.checkpointing.manifest import read_manifest

    if newest is None:
        return None
    try:
        manifest = read_manifest(newest)
        step, files = manifest.get("step"), manifest.get("files") or {}
        whole = all(os.path.getsize(newest / name) == entry["bytes"] for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # damaged: the Trainer falls back to an earlier checkpoint and trains on from there
    if not isinstance(step, int) or step < run.total_steps or not whole:
        return None
    return (f"megamobi: {run.run_dir} is already complete: {Path(newest).name} holds step {step} of the run's "
            f"{run.total_steps}; nothing to train (to train further raise train.steps or train.tokens, with "
            "optimizer.allow_schedule_change=true where that changes the lr schedule)")


def _is_rank0() -> bool:

    return os.environ.get("RANK", "0") == "0"  # launch_world_size() has mapped SLURM's variables by now


def verify_shards(run, *, check_only: bool, world_size: int) -> None:
    """--verify-shards: the full check of the shards' bytes; the sampled fingerprints that every resume
    compares are cheap but see only 17 blocks per file (megamobi/data/fingerprints.py)."""
    import time

    from megamobi.data.fingerprints import verify_shard_bytes
    from megamobi.data.stages import all_paths

    rank, world = (0, 1) if check_only else (int(os.environ.get("RANK", "0")), world_size)
    start = time.monotonic()
    count = verify_shard_bytes(all_paths(run.data_stages), rank=rank, world=world)
    if rank == 0:
        share = "" if world == 1 else f" (rank 0's share; each of the {world} ranks hashed its own)"
        print(f"megamobi: --verify-shards: {count} shards match their manifest.json sha256{share} "
              f"({time.monotonic() - start:.1f} s)", flush=True)


# gloo's / NCCL's words when the other end of a collective has gone away (it crashed, or it was killed)
PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


def main(argv: list[str] | None = None) -> int:
    from megamobi.training.run_lease import release_held

    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one: no traceback
        print("megamobi: interrupted (SIGINT) without a save; the newest complete checkpoint in run_dir is intact",
              file=sys.stderr, flush=True)
        return 130  # 128 + SIGINT, as a shell reports it
    finally:
        release_held()  # the run_dir's lease (rank 0): free for the next job, even in this process


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if not args.check_only:
        from megamobi.parent_watch import start_parent_watch

        start_parent_watch()  # a launcher that dies (even by SIGKILL) stops this rank after a save
    from megamobi.data import DataError
    from megamobi.distributed import launch_world_size
    from megamobi.training.data_stream import RunData
    from megamobi.training.run_config import load_run_config

    try:
        world_size = launch_world_size()  # WORLD_SIZE, or SLURM's variables when srun started this rank
        run = load_run_config(args.config, args.overrides)
        run.validate(world_size=world_size)
        # Open the shards now (headers only): a damaged shard or an unknown source weight fails here.
        data = RunData(run)
        from megamobi.training.append_logs import check_appended_logs
        from megamobi.training.preflight import check_start_checkpoints, check_validation_data
        from megamobi.training.resume_choice import resume_plan

        # run_dir's checkpoints all unusable: exit 2 listing them (or, asked for, a restart); --check-only
        # also checks their checksums. Then the logs: a torn last line will be cut off, other damage stops here.
        plan = resume_plan(run, verify=args.check_only)
        notes = plan.lines + ([] if plan.restart else check_appended_logs(run.run_dir))  # a restart moves them aside
        check_start_checkpoints(run, resume_from=plan.checkpoint)  # run_dir's model and position, checkpoint.init_from
        from megamobi.checkpointing.storage import check_storage

        check_storage(run, world_size=world_size)  # writable, and room for one more checkpoint: before any step
        check_validation_data(run, data)
        if args.verify_shards:
            verify_shards(run, check_only=args.check_only, world_size=world_size)
        from megamobi.training.data_provenance import check_resume_data

        accepted = check_resume_data(run)  # a resume onto other data than run_dir's checkpoints were trained on
        from megamobi.training.data_provenance import resume_content_note

        content_note = resume_content_note(run) if args.check_only else None
        from megamobi.training.schedule_checks import check_resume_schedule

        accepted += check_resume_schedule(run)  # a wsd decay may move before it begins
        from megamobi.training.faults import check_faults_for_run, faults_from_env

        # MEGAMOBI_FAULTS (tests and drills): a bad string fails here, naming the wrong part.
        check_faults_for_run(faults_from_env(), world_size=world_size, total_steps=run.total_steps)
        finished = already_complete(run, newest=plan.checkpoint)
        from megamobi.training.run_lease import RunLease, check_lease_free

        if args.check_only:
            check_lease_free(run.run_dir)  # another live job on this run_dir: exit 2 naming it
        elif not finished and _is_rank0():
            # Before the rendezvous: no rank writes anything until rank 0 holds the run_dir (run_lease.py).
            RunLease(run.run_dir).take(report=lambda line: print(line, flush=True))
    except (ConfigError, DataError) as err:
        print(f"megamobi: error: {err}", file=sys.stderr)
        return 2
    if args.check_only:
        from megamobi.training.schedule_table import schedule_lines

        print(f"megamobi: {args.config} is valid for {world_size} process(es)")
        for line in schedule_lines(run):
            print(line)
        for change in accepted:
            print(f"on resume, accepted and recorded: {change}")
        for note in notes:
            print(note)
        if content_note:
            print(f"on resume: {content_note}")
        if finished:
            print(finished)  # last: launch/pretrain.sh shows this line alone and starts no rank
        return 0
    if finished:  # a relaunch of a finished run (a requeue, a re-run script): say so, start no process group
        if os.environ.get("RANK", "0") == "0":
            print(finished, flush=True)
        return 0

    from megamobi.checkpointing.commit import CheckpointNotSaved
    from megamobi.distributed import init_distributed
    from megamobi.training.early_stop import ignore_late_signals
    from megamobi.training.loop import NonFiniteLossError, Trainer

    quiet_known_noise()
    import faulthandler

    # A fatal signal (SIGSEGV, SIGBUS: a memory map whose file was cut short) prints every thread's
    # Python stack, so the log says where it happened (shard samples are read without maps).
    faulthandler.enable(all_threads=True)
    try:
        init_distributed(rendezvous_timeout=run.launch.rendezvous_timeout_s,  # RendezvousError: exit 2
                         collective_timeout=run.launch.collective_timeout_s)
        trainer = Trainer(run, data=data)
        trainer.train()
        ignore_late_signals()  # the work is saved: a late SIGTERM must not make the exit look like a kill
    except (ConfigError, DataError) as err:  # DataError: e.g. the loader's token-id guard
        print(f"megamobi: error: {err}", file=sys.stderr)
        import torch.distributed as dist

        if dist.is_initialized():  # e.g. no usable checkpoint: leave the group before exit (a gloo thread
            dist.destroy_process_group()  # torn down by exit once ended in SIGABRT, "terminate called ...")
        return 2
    except NonFiniteLossError as err:
        print(f"megamobi: error: {err}", file=sys.stderr)
        return 3
    except CheckpointNotSaved as err:  # a full disk, a read-only mount: said in words, no traceback
        from megamobi.exit_codes import SAVE_FAILED

        print(f"megamobi: error: {err}", file=sys.stderr, flush=True)
        return SAVE_FAILED
    except RuntimeError as err:
        message = str(err).lower()
        if any(sign in message for sign in PEER_GONE):
            # A peer that ended (its own error, a kill) breaks this rank's collective: say so in one line, so
            # the log shows the first rank's reason (the launcher's last line names it), not a gloo traceback.
            print(f"megamobi: error: rank {os.environ.get('RANK', '0')}: another rank ended during a collective "
                  f"({str(err).splitlines()[0][:160]}); the rank that failed first says why (the launcher's last "
                  "line names it)", file=sys.stderr, flush=True)
            return 1
        if "timed out" not in message and "timeout" not in message:
            raise
        # gloo / NCCL gave up on a collective (launch.collective_timeout_s) before the watchdog did.
        from megamobi.exit_codes import HUNG

        print(f"megamobi: error: a collective did not complete within launch.collective_timeout_s "
              f"({run.launch.collective_timeout_s:g} s): another rank stopped or is unreachable "
              f"({str(err).splitlines()[0][:200]}); resume with the same command (exit status {HUNG})",
              file=sys.stderr)
        return HUNG
    if trainer.stopped_by:  # a signal (SLURM's time-limit warning, scancel) stopped it after a clean save
        from megamobi.training.early_stop import finish_early_stop
        from megamobi.training.launch_config import requeue_enabled

        return finish_early_stop(signal_name=trainer.stopped_by, step=trainer.state.step,
                                 checkpoint=trainer.last_checkpoint, requeue=requeue_enabled(run.launch),
                                 is_rank0=trainer.rank == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
