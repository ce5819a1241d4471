"""What a run does after a signal stopped it with a clean checkpoint: requeue itself under SLURM,
say so in the last log line, and return exit status 75 (megamobi/exit_codes.py).

Only SIGUSR1 (SLURM's `--signal=USR1@600` time-limit warning) requeues: a SIGTERM means someone
cancelled the job (`scancel`) or preempted it, and SLURM requeues preempted jobs itself when its
PreemptMode says so.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megamobi.exit_codes import STOPPED_AFTER_SAVE


def slow_save_for_tests() -> None:
    """Test hook (MEGAMOBI_TEST_SAVE_DELAY_S): sleep in the middle of writing a checkpoint, so that
    the tests can signal a run while a (big) checkpoint is being written."""
    delay = float(os.environ.get("MEGAMOBI_TEST_SAVE_DELAY_S", "0") or 0)
    if delay > 0:
        import time

        time.sleep(delay)


def ignore_late_signals() -> None:
    """Once training has returned (finished, or stopped after its save), a late SIGTERM / SIGUSR1 (SLURM
    signals every process again when it requeues or ends the job) must not turn the exit into "killed
    by SIGTERM": Python resets its own handlers to the default while exiting, so ignore them outright."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def requeue_job(job_id: str, *, resumes_from: str = "this checkpoint") -> str:
    """`scontrol requeue JOB`: SLURM ends this allocation and queues the same job again."""
    try:
        # SLURM signals every process of the job as it requeues it, scontrol included: under load its
        # SIGTERM could land before scontrol had reported success. An ignored signal stays ignored
        # across exec, so scontrol answers and ends on its own (within KillWait, long before SIGKILL).
        done = subprocess.run(["sh", "-c", 'trap "" TERM; exec scontrol requeue "$1"', "requeue", job_id],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"could not requeue SLURM job {job_id} ({err}): resubmit the same command to continue"
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        return (f"`scontrol requeue {job_id}` failed ({why[-1] if why else f'status {done.returncode}'}): "
                "resubmit the same command to continue")
    return f"requeued SLURM job {job_id} (scontrol requeue): it resumes from {resumes_from} when it starts again"


def finish_early_stop(*, signal_name: str, step: int, checkpoint: Path | None, requeue: bool, is_rank0: bool) -> int:
    """Rank 0 requeues (if asked and under SLURM) and prints the run's last line; every rank returns 75."""
    if is_rank0:
        job_id = os.environ.get("SLURM_JOB_ID")
        if signal_name == "SIGUSR1" and requeue and job_id:
            next_step = requeue_job(job_id)
        elif job_id and signal_name == "SIGUSR1":
            next_step = "launch.requeue is off: resubmit the same command to continue"
        else:
            next_step = "run the same command again to continue"
        saved = f"after saving {checkpoint}" if checkpoint else "after a clean save"
        print(f"megamobi: stopped early by {signal_name} at step {step} {saved}; {next_step} "
              f"(exit status {STOPPED_AFTER_SAVE})", flush=True)
    return STOPPED_AFTER_SAVE
