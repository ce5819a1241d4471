"""The JSON-lines logs a run appends to (RUN_DIR/metrics.jsonl, RUN_DIR/events.jsonl), checked on every start.

Each line is written with one write() of `json + "\\n"`; a full disk or a crash in the middle of that
write leaves a torn last line (part of the JSON, no newline; or, after a crash of the machine, a run
of NUL bytes). Read as it is, such a line stopped every later start with a JSONDecodeError, and the
next append would be glued onto it. So on every start the torn last line is cut off (it was never a
whole record: nothing of value is lost) with one line saying where and what. A damaged line anywhere
else was once a whole record that something overwrote: dropping it silently would lose data from the
middle of the run's history, so that is a user-facing error (exit 2) naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megamobi.config_io import ConfigError

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"  # megamobi.training.events
APPENDED_LOGS = (METRICS_FILE, EVENTS_FILE)  # every log a run appends lines to (rank 0 and, for events, any rank)


class DamagedLogLine(ConfigError):
    """A line that is not the last one of an appended log does not parse (exit 2)."""


def _record(line: bytes, *, needs_step: bool = True) -> dict[str, Any] | None:
    """The JSON object of one log line, or None; metrics.jsonl's lines all have an integer `step`
    (what a resume truncates by)."""
    try:
        value = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    step = value.get("step")
    if needs_step and (isinstance(step, bool) or not isinstance(step, int)):
        return None
    return value


def _shown(data: bytes, limit: int = 60) -> str:
    text = data.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def torn_tail(path: Path) -> tuple[int, bytes] | None:
    """(byte offset, bytes) of the torn last line of `path`, or None when the file is whole.
    Raises DamagedLogLine for a damaged line before the last one."""
    data = path.read_bytes()
    needs_step = path.name == METRICS_FILE
    lines = data.split(b"\n")
    last = lines.pop()  # after the final newline: b"" when the file ends with one
    if not last and lines and _record(lines[-1], needs_step=needs_step) is None:
        last = lines.pop() + b"\n"  # a complete-looking but unreadable last line (NUL bytes and a newline)
    offset = 0
    for number, line in enumerate(lines, start=1):
        if line.strip() and _record(line, needs_step=needs_step) is None:  # a blank line is harmless
            raise DamagedLogLine(
                f"{path}: line {number} (at byte {offset}) is not a log record ({_shown(line)}), and {len(lines) - number} "
                f"line(s) follow it, so it is not a torn last write: something overwrote it. Nothing was changed; "
                f"delete or repair that line (or move {path.name} aside) and run the same command again")
        offset += len(line) + 1
    if not last or (not last.endswith(b"\n") and _record(last, needs_step=needs_step) is not None):
        return None  # whole (a last record missing only its newline is whole too: fix_tail adds the newline)
    return offset, last


def fix_tail(path: Path, *, report) -> None:
    """Cut off the torn last line of one appended log (one `report` line saying so); add the newline
    to a whole last record that lacks it; raise DamagedLogLine for damage before the last line."""
    if not path.is_file():
        return
    torn = torn_tail(path)
    data_size = path.stat().st_size
    if torn is None:
        if data_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "ab") as stream:  # the write lost only its newline: keep the record
                stream.write(b"\n")
        return
    offset, cut = torn
    with open(path, "r+b") as stream:
        stream.truncate(offset)
        stream.flush()
        os.fsync(stream.fileno())
    report(f"{path}: cut off a torn last line at byte {offset} ({len(cut)} bytes: {_shown(cut)}), left by a write "
           "that did not finish (a full disk or a crash); the records before it are intact")


def check_appended_logs(run_dir: str | Path) -> list[str]:
    """Read-only, for every start before any process group and for --check-only: raises DamagedLogLine
    for a damaged line before the last one; returns what the start will cut off (one line each)."""
    notes = []
    for name in APPENDED_LOGS:
        path = Path(run_dir) / name
        torn = torn_tail(path) if path.is_file() else None
        if torn is not None:
            notes.append(f"{path}: its torn last line ({len(torn[1])} bytes at byte {torn[0]}) will be cut off")
    return notes


def fix_appended_logs(run_dir: str | Path, *, report) -> None:
    """Rank 0, once at start before anything is appended: fix_tail() of every appended log."""
    for name in APPENDED_LOGS:
        fix_tail(Path(run_dir) / name, report=report)


def truncate_metrics(path: Path, *, after_step: int, report=print) -> None:
    """Keep the lines of steps up to `after_step` (a resume, a rewind: the log reads as if the run had
    never been interrupted), after cutting off a torn last line."""
    if not path.is_file():
        return
    fix_tail(path, report=lambda msg: report(f"[megamobi] {msg}"))
    kept = [line for line in path.read_bytes().splitlines() if line and _record(line)["step"] <= after_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(line + b"\n" for line in kept))
    tmp.replace(path)
