"""Helpers for the tests that run through a real SLURM (tests/slurm/cluster.sh): bring the cluster up
once per session, submit with sbatch, wait for jobs, read their logs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLUSTER = HERE / "cluster.sh"


class Cluster:
    """Started by the session fixture; stops only the daemons that cluster.sh started for it."""

    def __init__(self):
        self.env: dict[str, str] = {}
        self.skip_reason: str | None = None
        self.started_here = False

    def start(self) -> None:
        if shutil.which("bash") is None:
            self.skip_reason = "no bash"
            return
        slurm_dir = Path(os.environ.get("MEGAMOBI_SLURM_DIR", "/tmp/megamobi-slurm"))
        had_started = (slurm_dir / "started").is_file()
        out = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=600)
        if out.returncode == 3:
            self.skip_reason = "SLURM cannot be installed or started here: " + out.stderr.strip().splitlines()[-1]
            return
        if out.returncode != 0:
            raise RuntimeError(f"tests/slurm/cluster.sh start failed ({out.returncode}): {out.stderr}")
        conf = re.search(r"export SLURM_CONF=(\S+)", out.stdout).group(1)
        self.env = {"SLURM_CONF": conf}
        self.started_here = not had_started and (slurm_dir / "started").is_file()

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=60)

    def job_env(self, **extra: str) -> dict[str, str]:
        """The submitting shell's environment: sbatch hands it to the job (--export=ALL)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEGAMOBI_", "NPROC", "MASTER_"))}
        return {**env, **self.env, "OMP_NUM_THREADS": "1", **extra}

    def sbatch(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env={**os.environ, **self.env},
                             capture_output=True, text=True, timeout=30).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, *, timeout: float = 240) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            assert time.monotonic() < deadline, f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s"
            time.sleep(0.5)

    def scancel(self, job_id: str, *args: str) -> None:
        subprocess.run(["scancel", *args, job_id], env={**os.environ, **self.env}, check=True, timeout=30)

    def hostnames(self, hostlist: str) -> list[str] | None:
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], env={**os.environ, **self.env},
                             capture_output=True, text=True, timeout=30)
        return out.stdout.split() if out.returncode == 0 and out.stdout.strip() else None  # None: "Invalid hostlist"

    def hostlist(self, hosts: list[str]) -> str:
        out = subprocess.run(["scontrol", "show", "hostlist", ",".join(hosts)], env={**os.environ, **self.env},
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout.strip()


def log_lines(job_log: Path) -> list[str]:
    """The job's output without DeepSpeed's accelerator warnings."""
    return [line for line in job_log.read_text().splitlines() if line.strip() and "WARNING]" not in line]
