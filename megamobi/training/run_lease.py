"""One job per run_dir: rank 0 holds an exclusive lock on RUN_DIR/lease.lock for the job's life.

Two jobs writing one run_dir (two launches with different MASTER_PORTs, a resubmit while the first
job still runs) overwrite each other's checkpoints and interleave metrics.jsonl. Rank 0 takes the
lease before the process group forms; the other ranks cannot write before then, since everything
they write comes after the rendezvous with rank 0. A second job's rank 0 (and its `--check-only`)
finds the lock held and exits 2 naming the holder.

The lock is a POSIX record lock (fcntl.lockf): the kernel drops it when the holder dies, however it
dies, and NFS (lockd / NFSv4) and Lustre with `-o flock` carry it between hosts. A POSIX lock is
released when its process closes ANY descriptor of the file, so nothing else in a rank may open
lease.lock. The file names its holder (host, pid, SLURM job id, start time); a clean exit empties
it, so a holder left in a file whose lock is free is a job that died: it is taken over with one line.
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path

from megamobi.config_io import ConfigError

LEASE_NAME = "lease.lock"
_HELD = (errno.EAGAIN, errno.EACCES)  # lockf's "someone else holds it"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a filesystem without locks


class LeaseHeld(ConfigError):
    """Another live job holds the run_dir's lease: exit status 2, naming it."""


def lease_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEASE_NAME


def describe_holder(record: dict) -> str:
    """'pid 1234 on host gpu001 (SLURM job 81234), since 2026-12-07 15:02:11 UTC'."""
    if not record:
        return "a process that left no name in the lease file"
    job = f" (SLURM job {record['slurm_job_id']})" if record.get("slurm_job_id") else ""
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')}{job}, since {record.get('since', '?')}"


def _read_record(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        record = json.loads(text) if text else {}
        return record if isinstance(record, dict) else {"pid": "?", "host": f"? (unreadable lease: {text[:80]!r})"}
    except (OSError, ValueError):
        return {"pid": "?", "host": "? (unreadable lease file)"}


def held_error(run_dir: str | Path, record: dict) -> LeaseHeld:
    job = record.get("slurm_job_id")
    stop = f"scancel {job}" if job else f"kill {record.get('pid', 'PID')} on {record.get('host', 'its host')}"
    return LeaseHeld(f"{run_dir} is in use by another job: {describe_holder(record)} (lease file {lease_path(run_dir)}). "
                     "Two jobs on one run_dir overwrite each other's checkpoints and logs: wait for that job to end, "
                     f"stop it ({stop}), or give this run another run_dir")


def check_lease_free(run_dir: str | Path) -> None:
    """For --check-only: raise LeaseHeld when a live job holds the lease (takes nothing; a shared lock
    needs only read access, so a read-only run_dir is left for the storage checks to report)."""
    try:
        fd = os.open(lease_path(run_dir), os.O_RDONLY)
    except OSError:
        return  # no lease file (a new run_dir) or unreadable: nobody can hold it through this path
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in _HELD:
            raise held_error(run_dir, _read_record(fd)) from None
    finally:
        os.close(fd)  # also drops the probe's shared lock


_HELD_LEASES: list[RunLease] = []


def release_held() -> None:
    """Release every lease this process holds: megamobi.pretrain's main() returns (called in-process,
    a later run or a subprocess on the same run_dir must find it free)."""
    while _HELD_LEASES:
        _HELD_LEASES.pop().release()


class RunLease:
    """The lease rank 0 holds; `take()` once, before the process group forms."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def take(self, *, report=print) -> None:
        """Lock or raise LeaseHeld; report() gets the one line of a takeover from a dead job, or the
        warning of a filesystem without locks (then the run goes on unprotected)."""
        path = lease_path(self.run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise ConfigError(f"cannot create the run_dir's lease file {path}: {err.strerror}; make run_dir writable "
                              "or choose another run_dir") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            record = _read_record(fd)
            os.close(fd)
            if err.errno in _HELD:
                raise held_error(self.run_dir, record) from None
            if err.errno in _NO_LOCKS:
                report(f"[megamobi] warning: the filesystem of {self.run_dir} has no file locks ({err.strerror}): "
                       "nothing stops a second job from writing this run_dir at the same time")
                return
            raise ConfigError(f"cannot lock the run_dir's lease file {path}: {err.strerror}") from None
        previous = _read_record(fd)
        if previous:
            report(f"[megamobi] took over the lease on {self.run_dir} from {describe_holder(previous)}: that job "
                   "is gone (it ended without releasing it)")
        since = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                  "since": since}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as err:
            os.close(fd)
            raise ConfigError(f"cannot write the run_dir's lease file {path}: {err.strerror}; make run_dir writable "
                              "(and give it free space) or choose another run_dir") from None
        self.fd = fd
        _HELD_LEASES.append(self)
        atexit.register(self.release)

    def release(self) -> None:
        """Empty the file (a clean end, not a dead holder) and drop the lock."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass  # a full or read-only disk: the next job then says it took the lease over
        os.close(fd)
