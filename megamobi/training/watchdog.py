"""Hang detection: every rank's heartbeat in the run_dir, a watchdog thread per rank, stack dumps.

The training loop tells its `Heartbeat` where it is (step, micro-batch, phase: data, forward,
backward, optimizer, validation, save): plain attribute writes, no I/O. A daemon thread per rank
writes that to RUN_DIR/logs/heartbeats/rankNNNNN.json every few seconds and checks its own rank:

- no progress (no new phase) for launch.hang_timeout_s: the job is hung;
- SIGTERM received and no progress for launch.stop_grace_s since: the job cannot reach its save;
- another rank already reported a hang (its report file exists): stop too.

Then it dumps this process's Python stacks (every thread) into RUN_DIR/logs/hang-<attempt>/, and the
first rank to create the report file names the culprits from everyone's heartbeat files: ranks whose
heartbeat stopped (SIGSTOP, a process stuck holding Python's lock, a dead host) and ranks behind the
others (a rank sleeping or looping outside a collective while the rest wait in one). It prints one
line, appends the event to events.jsonl, requeues the SLURM job after a hang (launch.requeue), and
every rank exits with status 76 (megamobi/exit_codes.py).

Why files and a thread per rank: a SIGSTOPped rank runs no code at all, and a TCPStore is served by
rank 0's process (stop rank 0 and every store read blocks); the ranks waiting inside a gloo/NCCL
collective still run their watchdog threads, and at 160 ranks one small write per rank every 10 s
is nothing for a shared filesystem. A rank that cannot run its own watchdog is named by the others.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from megamobi.exit_codes import HUNG
from megamobi.training.events import append_event, who

PHASES = ("start", "data", "forward", "backward", "optimizer", "validation", "save")
HEARTBEATS = Path("logs") / "heartbeats"


class Heartbeat:
    """Where this rank is. Written by the training loop, read by the watchdog thread."""

    def __init__(self) -> None:
        self.step = 0  # the step in progress (1-based, as logged)
        self.micro_batch = 0
        self.phase = "start"
        self.progress_at = time.monotonic()
        self.sigterm_at: float | None = None  # set by the SIGTERM handler (monotonic time)

    def beat(self, phase: str, *, step: int | None = None, micro_batch: int | None = None) -> None:
        if step is not None:
            self.step = step
        if micro_batch is not None:
            self.micro_batch = micro_batch
        self.phase = phase
        self.progress_at = time.monotonic()

    def progress_key(self) -> tuple[int, int, int]:
        return progress_key(self.step, self.micro_batch, self.phase)


def progress_key(step: int, micro_batch: int, phase: str) -> tuple[int, int, int]:
    return step, micro_batch, PHASES.index(phase) if phase in PHASES else 0


@dataclasses.dataclass(frozen=True)
class WatchdogConfig:
    run_dir: Path
    rank: int
    world_size: int
    host: str
    attempt: str  # the same on every rank of one launch: names this launch's report folder
    hang_timeout_s: float
    stop_grace_s: float
    requeue: bool  # requeue the SLURM job after a hang (launch.requeue)

    @property
    def interval_s(self) -> float:
        """How often a heartbeat is written and checked: well inside both timeouts, at most 10 s."""
        return min(max(min(self.hang_timeout_s, self.stop_grace_s) / 5, 0.2), 10.0)

    @property
    def stale_after_s(self) -> float:
        """A heartbeat file older than this belongs to a process that runs no Python."""
        return 3 * self.interval_s + 1.0

    @property
    def report_dir(self) -> Path:
        return self.run_dir / "logs" / f"hang-{self.attempt}"


def heartbeat_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / HEARTBEATS / f"rank{rank:05d}.json"


def read_heartbeats(config: WatchdogConfig) -> dict[int, dict]:
    """This launch's heartbeat of every rank that wrote one."""
    found = {}
    for rank in range(config.world_size):
        try:
            beat = json.loads(heartbeat_path(config.run_dir, rank).read_text())
        except (OSError, ValueError):
            continue
        if beat.get("attempt") == config.attempt:
            found[rank] = beat
    return found


def name_culprits(beats: dict[int, dict], *, world_size: int, now: float, stale_after_s: float) -> list[dict]:
    """[{rank, host, why}]: ranks without a heartbeat, ranks whose heartbeat stopped, then the live ranks
    furthest behind (when some rank is ahead of them). Empty when every rank waits at the same point."""
    culprits = []
    for rank in range(world_size):
        if rank not in beats:
            culprits.append({"rank": rank, "host": "?", "why": "never wrote a heartbeat in this launch"})
    live = {}
    for rank, beat in sorted(beats.items()):
        age = now - beat["written_at"]
        where = f"step {beat['step']} {beat['phase']} (micro-batch {beat['micro_batch']})"
        if age > stale_after_s:
            culprits.append({"rank": rank, "host": beat["host"], "pid": beat["pid"],
                             "why": f"its heartbeat stopped {age:.0f} s ago at {where}: the process runs no Python "
                                    "(stopped, e.g. SIGSTOP, or stuck holding Python's lock)"})
        else:
            live[rank] = beat
    keys = {r: progress_key(b["step"], b["micro_batch"], b["phase"]) for r, b in live.items()}
    if keys and min(keys.values()) < max(keys.values()):
        lowest, ahead = min(keys.values()), live[max(keys, key=keys.get)]
        for rank, key in sorted(keys.items()):
            if key == lowest:
                beat = live[rank]
                culprits.append({"rank": rank, "host": beat["host"], "pid": beat["pid"],
                                 "why": f"behind: at step {beat['step']} {beat['phase']} (micro-batch "
                                        f"{beat['micro_batch']}) for {beat['in_phase_s']:.0f} s while others reached "
                                        f"step {ahead['step']} {ahead['phase']}"})
    return culprits


class SignalWatch:
    """Signals as they arrive, for a thread: Python runs a signal's handler in the main thread only
    when that thread returns to the interpreter, which a rank stuck in a collective never does. The
    C-level handler writes the signal number to a wakeup pipe at once; the watchdog reads it there."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        try:
            self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        except ValueError:  # not the main thread: no signal handlers here either
            self._previous = None

    def poll(self) -> list[int]:
        try:
            return list(os.read(self._read, 512))
        except (BlockingIOError, OSError):
            return []

    def close(self) -> None:
        if self._previous is not None:
            try:
                signal.set_wakeup_fd(self._previous)
            except ValueError:
                pass
        for fd in (self._read, self._write):
            os.close(fd)


class Watchdog:
    """The per-rank thread. `start()` after the process group exists (in the main thread, which owns
    the signal handlers), `stop()` when training returns."""

    def __init__(self, config: WatchdogConfig, heartbeat: Heartbeat, *, newest_checkpoint: Callable[[], str | None]):
        self.config = config
        self.heartbeat = heartbeat
        self.newest_checkpoint = newest_checkpoint
        self._stopped = threading.Event()
        self._signals: SignalWatch | None = None
        self._thread = threading.Thread(target=self._run, name="megamobi-watchdog", daemon=True)

    def start(self) -> None:
        self._write_heartbeat()
        self._signals = SignalWatch()
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self._signals is not None:
            self._signals.close()
            self._signals = None

    def _write_heartbeat(self) -> None:
        hb, now = self.heartbeat, time.monotonic()
        record = {"rank": self.config.rank, "host": self.config.host, "pid": os.getpid(), "attempt": self.config.attempt,
                  "step": hb.step, "micro_batch": hb.micro_batch, "phase": hb.phase,
                  "in_phase_s": round(now - hb.progress_at, 3), "written_at": time.time()}
        path = heartbeat_path(self.config.run_dir, self.config.rank)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(record))  # no fsync: a heartbeat is only worth its freshness
            os.replace(tmp, path)
        except OSError:
            pass  # a full or read-only disk is reported by the save; the watchdog keeps watching

    def _run(self) -> None:
        report = self.config.report_dir / "report.txt"
        while not self._stopped.wait(self.config.interval_s):
            if signal.SIGTERM in self._signals.poll() and self.heartbeat.sigterm_at is None:
                self.heartbeat.sigterm_at = time.monotonic()
            self._write_heartbeat()
            cause = self._cause(report_exists=report.exists())
            if cause is not None and not self._stopped.is_set():
                self._give_up(cause)

    def _cause(self, *, report_exists: bool) -> str | None:
        hb, now = self.heartbeat, time.monotonic()
        if now - hb.progress_at > self.config.hang_timeout_s:
            return "hang"
        if hb.sigterm_at is not None and now - max(hb.progress_at, hb.sigterm_at) > self.config.stop_grace_s:
            return "stop_timeout"
        return "peer" if report_exists else None

    def _give_up(self, cause: str) -> None:
        """Dump this rank's stacks; the first rank here writes the report; exit 76 (no cleanup: the
        main thread is stuck, and a save is exactly what cannot happen now)."""
        try:
            self._dump_and_report(cause)
        except OSError as err:  # a full or read-only run_dir: still end the job, saying what is missing
            print(f"megamobi: rank {self.config.rank}: {cause}: no progress at step {self.heartbeat.step} "
                  f"{self.heartbeat.phase}; could not write the hang report ({err}) (exit status {HUNG})",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(HUNG)

    def _dump_and_report(self, cause: str) -> None:
        config, hb = self.config, self.heartbeat
        config.report_dir.mkdir(parents=True, exist_ok=True)
        dump = config.report_dir / f"rank{config.rank:05d}-{config.host}.txt"
        with open(dump, "w") as stream:
            stream.write(f"rank {config.rank} on {config.host}, pid {os.getpid()}: step {hb.step} {hb.phase} "
                         f"(micro-batch {hb.micro_batch}), no progress for {time.monotonic() - hb.progress_at:.1f} s; "
                         f"watchdog cause: {cause}\n\n")
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
        fd = None
        if cause != "peer":
            try:
                fd = os.open(config.report_dir / "report.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
        if fd is not None:
            with os.fdopen(fd, "w") as stream:
                self._report(stream, cause=cause)
            (config.report_dir / "done").touch()
        else:
            # Exit only once the reporter has requeued the job: under SLURM the first exit ends the job
            # step (--kill-on-bad-exit), which would kill the reporter mid-requeue.
            deadline = time.monotonic() + 2 * config.interval_s + 30
            while not (config.report_dir / "done").exists() and time.monotonic() < deadline:
                time.sleep(0.1)

    def _report(self, stream, *, cause: str) -> None:
        config, hb = self.config, self.heartbeat
        beats = read_heartbeats(config)
        culprits = name_culprits(beats, world_size=config.world_size, now=time.time(), stale_after_s=config.stale_after_s)
        waited = time.monotonic() - (max(hb.progress_at, hb.sigterm_at or 0) if cause == "stop_timeout" else hb.progress_at)
        if cause == "hang":
            what = f"hang: no progress for {waited:.0f} s (launch.hang_timeout_s {config.hang_timeout_s:g}) at step {hb.step}"
        else:
            what = (f"SIGTERM received, but the run made no progress for {waited:.0f} s (launch.stop_grace_s "
                    f"{config.stop_grace_s:g}) at step {hb.step}: no save was possible")
        hosts = [beats.get(r, {}).get("host", "?") for r in range(config.world_size)]
        ranks = [c["rank"] for c in culprits]
        named = (f"{who(ranks, hosts)}: " + "; ".join(c["why"] for c in culprits) if culprits else
                 f"no rank is behind: every rank waits at step {hb.step} {hb.phase} (a collective that never completes)")
        newest = self.newest_checkpoint()
        resume = f"the newest checkpoint is {newest}" if newest else "no checkpoint was written yet"
        stream.write(f"{what}\n{named}\nstacks of the live ranks: {config.report_dir}/rank*.txt\n{resume}\n")
        stream.flush()
        append_event(config.run_dir, {"step": hb.step, "kind": cause, "ranks": ranks,
                                      "hosts": [hosts[r] for r in ranks], "action": f"stopped (exit status {HUNG})",
                                      "culprits": culprits, "stacks": str(config.report_dir)})
        self._wait_for_dumps(beats, culprits)  # the other live ranks see report.txt within one interval
        next_step = "run the same command again to resume"
        job_id = os.environ.get("SLURM_JOB_ID")
        if cause == "hang" and job_id and config.requeue:
            from megamobi.training.early_stop import requeue_job

            next_step = requeue_job(job_id, resumes_from="the newest checkpoint")  # SLURM then ends the job
        stream.write(next_step + "\n")
        print(f"megamobi: {what}; {named}; stacks in {config.report_dir}; {resume}; {next_step} (exit status {HUNG})",
              file=sys.stderr, flush=True)

    def _wait_for_dumps(self, beats: dict[int, dict], culprits: list[dict]) -> None:
        """Give the other live ranks time to write their stacks before this one requeues the job (SLURM
        then ends every process) or exits (the launcher then stops what is left)."""
        stale = {c["rank"] for c in culprits if "heartbeat stopped" in c["why"]}
        expected = [r for r in beats if r not in stale and r != self.config.rank]
        deadline = time.monotonic() + 2 * self.config.interval_s + 1
        while time.monotonic() < deadline:
            if all(list(self.config.report_dir.glob(f"rank{r:05d}-*.txt")) for r in expected):
                return
            time.sleep(0.1)
