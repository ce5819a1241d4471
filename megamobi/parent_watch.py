"""Ranks never outlive their launcher: a thread in each rank watches the launcher processes above it.

A launcher that dies (SIGKILL, the OOM killer, a crash) cannot forward signals or stop its ranks:
they are re-parented to init and would train and save to the end, while whoever started the job
believes it failed and may start another on the same run_dir. So each rank watches
- megamobi.launcher, its parent (named by MEGAMOBI_LAUNCHER_PID, which the launcher sets), or
- DeepSpeed's per-node launcher (`python -m deepspeed.launcher.launch`, its parent) and, when that
  was started by the `deepspeed` command on this machine, that command too: a SIGTERM kills the
  `deepspeed` command (it installs no handler on one machine) without reaching anyone else.
When one of them is gone (checked every 0.25 s, by pid and start time, so a reused pid does not
fool it), the rank sends itself SIGTERM: it finishes its step, saves a checkpoint and exits with
status 75, as when a launcher forwards SIGTERM (launch.stop_grace_s bounds a rank that cannot).
A rank started any other way (srun, torchrun, by hand, under nohup) watches nothing: its parent's
end is no reason to stop. megamobi.launcher itself watches launch/pretrain.sh on one machine
(MEGAMOBI_SCRIPT_PID): a SIGKILL of the script makes it forward SIGTERM to the ranks.

A thread, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread* that started the rank
ends, and cannot see a grandparent. Before the SIGTERM, a stdout/stderr that was a pipe to the dead
launcher (megamobi.launcher reads the ranks' stderr) is pointed at the other stream, or /dev/null,
so the save's log lines cannot fail with a broken pipe; a write that comes first does the same
(_RescuingPipe), so no rank dies of a log line between the launcher's death and the watch's check.
"""

from __future__ import annotations

import dataclasses
import io
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable

LAUNCHER_PID_ENV = "MEGAMOBI_LAUNCHER_PID"
SCRIPT_PID_ENV = "MEGAMOBI_SCRIPT_PID"  # launch/pretrain.sh, for megamobi.launcher on one machine
POLL_S = 0.25


@dataclasses.dataclass(frozen=True)
class Watched:
    pid: int
    start: str | None  # /proc/PID/stat's start time: a pid reused by another process is not the launcher
    name: str


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (field 3 onwards), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rpartition(")")[2].split()
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _gone(watched: Watched) -> bool:
    """True once the process has ended for good: no such pid, another process under it, or a zombie
    with no thread left. A killed multi-threaded launcher's main thread turns zombie while its other
    threads still exit, and those still hold its files (the read end of a rank's stderr pipe) open."""
    fields = _stat_fields(watched.pid)
    if not fields or fields[19] != watched.start:
        return True
    if fields[0] not in ("Z", "X"):
        return False
    try:
        return not any(task != str(watched.pid) for task in os.listdir(f"/proc/{watched.pid}/task"))
    except OSError:
        return True


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return [arg.decode(errors="replace") for arg in stream.read().split(b"\0") if arg]
    except OSError:
        return []


def _is_deepspeed_node_launcher(argv: list[str]) -> bool:
    return "deepspeed.launcher.launch" in argv[:4]


def _is_deepspeed_command(argv: list[str]) -> bool:
    """`deepspeed ...` runs as `python .../bin/deepspeed ...` (or its own `deepspeed` executable)."""
    return any(os.path.basename(arg) in ("deepspeed", "ds") or arg == "deepspeed.launcher.runner" for arg in argv[:3])


def launchers_to_watch(env: dict[str, str], *, parent: int) -> list[Watched] | None:
    """The launcher processes this rank must not outlive; None when the launcher is already gone."""
    expected = env.get(LAUNCHER_PID_ENV, "")
    if expected.isdigit():
        if int(expected) != parent:
            return None  # megamobi.launcher died before this rank got here: re-parented already
        return [Watched(parent, _start_time(parent), f"megamobi.launcher (pid {parent})")]
    if not _is_deepspeed_node_launcher(_cmdline(parent)):
        return []
    watched = [Watched(parent, _start_time(parent), f"DeepSpeed's per-node launcher (pid {parent})")]
    grandparent = _ppid(parent)
    if grandparent and grandparent > 1 and _is_deepspeed_command(_cmdline(grandparent)):
        watched.append(Watched(grandparent, _start_time(grandparent), f"the deepspeed command (pid {grandparent})"))
    return watched


def _broken_pipe(fd: int) -> bool:
    """True when fd is a pipe nobody reads any more (poll reports POLLERR on its write end)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except OSError:
        return False


def _rescue_output() -> None:
    broken = [fd for fd in (1, 2) if _broken_pipe(fd)]
    healthy = [fd for fd in (1, 2) if fd not in broken]
    for fd in broken:
        if healthy:
            os.dup2(healthy[0], fd)
        else:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


class _RescuingPipe(io.RawIOBase):
    """The raw layer under sys.stdout / sys.stderr when they are pipes: a write that finds the reader
    (the launcher) gone rescues the stream and writes again, instead of raising BrokenPipeError in
    whatever the rank was doing (a log line in the middle of a step or a save)."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data) -> int:
        try:
            return os.write(self._fd, data)
        except BrokenPipeError:
            _rescue_output()
            return os.write(self._fd, data)


def _guard_streams() -> None:
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, name)
        try:
            if stream is None or stream.fileno() != fd or not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
        except (OSError, ValueError, AttributeError):
            continue
        stream.flush()
        setattr(sys, name, io.TextIOWrapper(_RescuingPipe(fd), encoding=stream.encoding, errors=stream.errors,
                                            line_buffering=stream.line_buffering, write_through=True))


def _stop(why: str) -> None:
    _rescue_output()
    rank = os.environ.get("RANK", "?")
    try:
        print(f"megamobi: rank {rank}: {why}: saving a checkpoint and stopping, as on SIGTERM", file=sys.stderr,
              flush=True)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _watch(watched: list[Watched], on_gone: Callable[[str], None]) -> None:
    while True:
        time.sleep(POLL_S)
        for launcher in watched:
            if _gone(launcher):
                on_gone(f"{launcher.name} is gone")
                return


def watch_launch_script(on_gone: Callable[[str], None], env: dict[str, str] | None = None) -> None:
    """In megamobi.launcher: launch/pretrain.sh, its parent on one machine (MEGAMOBI_SCRIPT_PID), watched
    the same way; on_gone(why) is called once, from the watch thread, when a SIGKILL has ended the script
    (it forwards every other signal itself)."""
    env = dict(os.environ if env is None else env)
    expected, parent = env.get(SCRIPT_PID_ENV, ""), os.getppid()
    if not os.path.isdir("/proc/self") or not expected.isdigit():
        return  # under srun (the script does not set it there), or started by hand: nothing to watch
    if int(expected) != parent:  # the script started this launcher and was killed before this point
        on_gone(f"launch/pretrain.sh (pid {expected}) is gone")
        return
    watched = [Watched(parent, _start_time(parent), f"launch/pretrain.sh (pid {parent})")]
    threading.Thread(target=_watch, args=(watched, on_gone), name="megamobi-script-watch", daemon=True).start()


def start_parent_watch(env: dict[str, str] | None = None) -> None:
    """Call first thing in a rank (before the heavy imports). Linux only (/proc); elsewhere nothing."""
    if not os.path.isdir("/proc/self"):
        return
    env = dict(os.environ if env is None else env)
    watched = launchers_to_watch(env, parent=os.getppid())
    if watched is None:
        _stop(f"megamobi.launcher (pid {env[LAUNCHER_PID_ENV]}) is gone")
        return
    if watched:
        _guard_streams()
        threading.Thread(target=_watch, args=(watched, _stop), name="megamobi-parent-watch", daemon=True).start()
