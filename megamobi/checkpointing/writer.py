"""Who writes a rank's part of a checkpoint, and when: now, or in one background thread.

`checkpoint.async: false`: the work runs at once and the save returns when it is published.
`checkpoint.async: true`: the job holds a snapshot (CPU copies) of the state, the work runs in a
background thread and training goes on. A save waits for the one before it; `wait()` (the end of a
run, the save a signal asked for) returns when the last one is done. A background save that fails
is reported by the rank that saw it (rank 0 for the whole checkpoint) and never published.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from megamobi.checkpointing.checkpoint_job import CheckpointJob, SnapshotBuffers
from megamobi.checkpointing.commit import CheckpointNotSaved


class CheckpointWriter:
    def __init__(self, *, background: bool, report: Callable[[str], None] = print) -> None:
        self.background = background
        self._snapshot = SnapshotBuffers() if background else None
        self.report = report  # one line to the user (the rank's prefix included)
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def new_job(self, directory: Path) -> CheckpointJob:
        return CheckpointJob(directory, snapshot=self._snapshot)

    def submit(self, work: Callable[[], None], *, what: str) -> None:
        """Run `work` (write one rank's files; rank 0 also publishes), after the save before it."""
        self.wait()
        if not self.background:
            work()
            return

        def run() -> None:
            try:
                work()
            except BaseException as err:  # reported here, raised by wait() (the next save, the next step)
                self._failed = err
                self.report(f"{err} (a background save)" if isinstance(err, CheckpointNotSaved) else
                            f"checkpoint {what} NOT saved (the background save failed, nothing was "
                            f"published; `latest` still names the previous checkpoint): {err}")

        # A daemon: a run that crashes is not kept alive by a save that can no longer be published.
        self._thread = threading.Thread(target=run, name=f"megamobi-save-{what}", daemon=True)
        self._thread.start()

    @property
    def failed(self) -> bool:
        """A background save has failed (and not yet been collected by wait()); does not block."""
        return self._failed is not None

    def wait(self) -> BaseException | None:
        """Block until the save in flight is done; returns the error that stopped it, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        failed, self._failed = self._failed, None
        return failed
