"""The resume state of an unfinished preprocessing run: an append-only JSON-lines log.

Line 1 is the run's fingerprint (inputs, sizes, settings); then one line per finished chunk, in
chunk order, with the chunk's shard records and statistics; then one line for the joined tails.
Each line is appended and fsynced after the shards it lists are in place, so the log never names
a shard that is not there, and the cost of a chunk's bookkeeping does not grow with the run (a
whole-state JSON rewritten per shard would grow quadratically). A line cut short by a kill is
ignored on resume.
"""
import json
import os
from pathlib import Path

from megamobi.files import read_json

from .manifest import PROGRESS_NAME

LEGACY_PROGRESS_NAME = ".progress.json"  # the whole-state file of earlier versions


def read_progress(directory: Path) -> tuple[dict | None, list[dict]]:
    """(fingerprint, records) of the log in `directory`; (None, []) when there is none."""
    path = directory / PROGRESS_NAME
    if not path.is_file():
        return None, []
    lines = path.read_bytes().split(b"\n")
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:  # a torn last line, or the empty string after the final newline
            break
    if not entries or "fingerprint" not in entries[0]:
        return None, []
    return entries[0]["fingerprint"], entries[1:]


def legacy_complete(directory: Path) -> bool:
    """An output finished by an earlier version (whole-state progress file marked complete)."""
    path = directory / LEGACY_PROGRESS_NAME
    return path.is_file() and bool(read_json(path).get("complete"))


class ProgressLog:
    """Open for appending, after rewriting the kept prefix of an earlier attempt atomically."""

    def __init__(self, directory: Path, *, fingerprint: dict, records: list[dict]) -> None:
        self._path = directory / PROGRESS_NAME
        tmp = self._path.with_name(self._path.name + ".tmp")
        with open(tmp, "w") as stream:
            for entry in [{"fingerprint": fingerprint}, *records]:
                stream.write(json.dumps(entry) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, self._path)
        self._stream = open(self._path, "a")

    def append(self, record: dict) -> None:
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()
