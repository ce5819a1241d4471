"""The run config's `launch:` section: how a run behaves under a scheduler (docs/launch.md).

    launch:
      requeue: true                 # on SLURM's time-limit warning (SIGUSR1): save, then `scontrol requeue`
      rendezvous_timeout_s: 600     # how long ranks wait for each other at start-up before failing
      hang_timeout_s: 600           # no progress for this long: stacks dumped, culprits named, exit 76
      collective_timeout_s: 1800    # gloo/NCCL's own limit on one collective (above hang_timeout_s)
      stop_grace_s: 120             # after SIGTERM, a run that makes no progress for this long gives up

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
    # The hang watchdog (megamobi/training/watchdog.py, docs/reliability.md).
    hang_timeout_s: float = 600.0
    collective_timeout_s: float = 1800.0
    stop_grace_s: float = 120.0

    def validate(self) -> None:
        for key in ("rendezvous_timeout_s", "hang_timeout_s", "collective_timeout_s", "stop_grace_s"):
            value = getattr(self, key)
            if not 0 < value < float("inf"):
                raise ConfigError(f"launch.{key} {value} must be a positive number of seconds")
        if self.hang_timeout_s >= self.collective_timeout_s:
            raise ConfigError(f"launch.hang_timeout_s {self.hang_timeout_s:g} must be below launch.collective_timeout_s "
                              f"{self.collective_timeout_s:g}: the watchdog must see a stuck job (and name the rank) "
                              "before a collective gives up with a bare timeout error")
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
