"""The run config's `launch:` section: how a run behaves under a scheduler (docs/launch.md).

    launch:
      requeue: true                 # on SLURM's time-limit warning (SIGUSR1): save, then `scontrol requeue`
      rendezvous_timeout_s: 600     # how long ranks wait for each other at start-up before failing

Environment switches win over the file, for a single submission: MEGAMOBI_REQUEUE=0|1,
MEGAMOBI_RENDEZVOUS_TIMEOUT=seconds.
"""

from __future__ import annotations

import dataclasses
import os

from megamobi.config_io import ConfigError

REQUEUE_ENV = "MEGAMOBI_REQUEUE"


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    requeue: bool = True
    rendezvous_timeout_s: float = 600.0

    def validate(self) -> None:
        if not self.rendezvous_timeout_s > 0:
            raise ConfigError(f"launch.rendezvous_timeout_s {self.rendezvous_timeout_s} must be a positive number "
                              "of seconds")
        requeue_enabled(self)  # a bad MEGAMOBI_REQUEUE fails now, not after hours of training
        from megamobi.distributed import rendezvous_timeout_s

        rendezvous_timeout_s(self.rendezvous_timeout_s)  # likewise MEGAMOBI_RENDEZVOUS_TIMEOUT


def requeue_enabled(config: LaunchConfig) -> bool:
    raw = os.environ.get(REQUEUE_ENV)
    if raw is None or raw == "":
        return config.requeue
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{REQUEUE_ENV}={raw!r} must be 1 or 0 (true/false)")
