import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))  # hostlist_cases, launch_runs

from slurm_jobs import Cluster


@pytest.fixture(scope="session")
def slurm():
    """A running single-host SLURM (tests/slurm/cluster.sh). Skips, saying why, only where SLURM
    cannot be installed or started; stops only the daemons it started itself."""
    cluster = Cluster()
    cluster.start()
    if cluster.skip_reason:
        pytest.skip(cluster.skip_reason)
    yield cluster
    cluster.stop()
