"""Why a launch failed, in the launcher's last line: the FIRST rank that failed and its own last words.

When one rank fails, the launcher stops the others, and they exit too (143 after the SIGTERM, or an
error from a collective whose peer vanished): a log that ends with those says nothing about the
cause. megamobi.launcher passes each rank's stderr through as it comes (whole lines, so ranks do not
cut into each other's lines), remembers its last lines, and ends with one line naming the rank that
failed first, its exit status and the last line it wrote.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
from typing import BinaryIO

from megamobi.exit_codes import FAILED, HUNG, NON_FINITE, SAVE_FAILED, USAGE

TAIL_LINES = 20


class RankStderr:
    """A thread copying one rank's stderr pipe to ours, keeping its last lines."""

    _write_lock = threading.Lock()  # one rank's line at a time on the shared stderr

    def __init__(self, pipe: BinaryIO, *, sink: BinaryIO | None = None):
        self.pipe = pipe
        self.sink = sink if sink is not None else sys.stderr.buffer
        self.tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        fd = self.pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1  # progress bars end in \r
            if cut:
                self._emit(pending[:cut])
                pending = pending[cut:]
        if pending:
            self._emit(pending + b"\n")
        self.pipe.close()

    def _emit(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self.sink.write(data)
                self.sink.flush()
            except (OSError, ValueError):  # our own stderr is gone: keep collecting the reason anyway
                pass
        for line in data.replace(b"\r", b"\n").split(b"\n"):
            if line.strip():
                self.tail.append(line)

    def last_line(self, *, timeout_s: float = 2.0) -> str | None:
        """The rank's last non-empty stderr line, once its pipe is drained (a grandchild that keeps
        the pipe open is waited for at most timeout_s)."""
        self.thread.join(timeout_s)
        return self.tail[-1].decode(errors="replace").strip() if self.tail else None


def describe_status(status: int) -> str:
    """An exit status in words (shell convention: 128 + N for a process killed by signal N)."""
    if status > 128:
        try:
            name = signal.Signals(status - 128).name
        except ValueError:
            name = f"signal {status - 128}"
        hints = {"SIGKILL": " (the out-of-memory killer, or a kill -9)",
                 # Shard samples are read without memory maps (megamobi/data/shard_reader.py); other maps remain.
                 "SIGBUS": " (a memory-mapped file was cut short while the rank read it; its Python stack is above)"}
        hint = hints.get(name, "")
        return f"killed by {name}{hint}, exit status {status}"
    meaning = {USAGE: "a user error caught before training", FAILED: "an error", NON_FINITE: "stopped on bad steps: non-finite values or divergence",
               HUNG: "hung, stopped by the hang watchdog", SAVE_FAILED: "a checkpoint could not be saved"}
    return f"exit status {status}" + (f" ({meaning[status]})" if status in meaning else "")


def failure_line(*, local_rank: int, rank: int, status: int, last_line: str | None, others: int) -> str:
    why = f'; its last line: "{last_line}"' if last_line else "; it wrote nothing to stderr"
    stopped = f"; this node's {others} other rank(s) were stopped after it" if others else ""
    return (f"megamobi.launcher: rank {rank} (local rank {local_rank}) failed first: {describe_status(status)}"
            f"{why}{stopped}")
