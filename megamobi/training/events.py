"""RUN_DIR/events.jsonl: what the run detected and did about it, one JSON object a line.

Every line has `step`, `kind`, `ranks`, `hosts`, `action` and `time` (UTC, ISO 8601); some add details
(`samples` skipped, `loss`, `tensors` that differ, ...). Kinds: `nan`, `inf`, `spike` (divergence, first
seen), `transient` / `data` (the verdict after the re-run), `replica_mismatch` and its verdicts, `hang`,
`stop_timeout`, `rerun_mismatch`. Unlike metrics.jsonl it is never truncated on resume or rewind:
it is the run's history (docs/reliability.md).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"


def append_event(run_dir: str | Path, record: dict[str, Any]) -> None:
    """One line, one write (O_APPEND): a line from any rank, never interleaved with another's."""
    line = {**record, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = Path(run_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write: the rest are still whole
    return events


def who(ranks: list[int], hosts: list[str]) -> str:
    """'rank 1 (node7)', 'ranks 0 (node1), 3 (node2)'."""
    if not ranks:
        return "no single rank"
    named = ", ".join(f"{r} ({hosts[r] if r < len(hosts) else '?'})" for r in ranks)
    return f"rank {named}" if len(ranks) == 1 else f"ranks {named}"
