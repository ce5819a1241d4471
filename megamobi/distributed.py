"""Starting torch.distributed the way every megamobi process does, under deepspeed, torchrun or srun.

Launchers say who a process is through environment variables:
- `deepspeed`, `torchrun`, megamobi.launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- `srun` (`deepspeed --launcher slurm`, or `srun python -m megamobi.pretrain ...`): only SLURM_PROCID,
  SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID and the step's node list. rank_env_from_slurm() maps them
  (DeepSpeed itself would want mpi4py): rank 0 is the first task of the first node, the master port is
  MASTER_PORT if exported, else 20000 + job id mod 20000 (as megamobi.launcher picks it).

The rendezvous is bounded: a master address that does not resolve, a master nobody can reach, or ranks
that never arrive fail after MEGAMOBI_RENDEZVOUS_TIMEOUT seconds (or the run config's
launch.rendezvous_timeout_s; default 600) with RendezvousError naming host and port, instead of
retrying forever. A MASTER_PORT already in use on rank 0's node fails at once.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import torch
import torch.distributed as dist

from megamobi.config_io import ConfigError

DEFAULT_RENDEZVOUS_TIMEOUT_S = 600
RENDEZVOUS_TIMEOUT_ENV = "MEGAMOBI_RENDEZVOUS_TIMEOUT"
# How long a collective may wait for the other ranks (a long checkpoint save on one rank while the
# others wait at its barrier) before gloo/NCCL gives up: launch.collective_timeout_s. The hang watchdog
# (launch.hang_timeout_s, shorter) normally reports a stuck job first, naming the rank.
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


class RendezvousError(ConfigError):
    """The processes of a job could not find each other; a launch mistake, reported with exit status 2."""


def rank_env_from_slurm(env: dict[str, str]) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for a task that srun started directly; {}
    when a launcher already set RANK, or outside an srun step (the batch script itself is no rank)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return {}
    from megamobi.launcher import LaunchError, expand_nodelist, slurm_master_port

    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("srun started this process but SLURM_STEP_NODELIST is not set: cannot find rank 0's node")
    mapped = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
              "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", ""),
              "MASTER_ADDR": env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
              "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_master_port(env.get("SLURM_JOB_ID", "0")))}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        if not mapped[key].isdigit():
            raise LaunchError(f"srun set {key} from SLURM variables to {mapped[key]!r}, not a number")
    return mapped


def apply_launcher_env() -> None:
    """Fill os.environ from SLURM's variables when srun started this process directly."""
    os.environ.update(rank_env_from_slurm(dict(os.environ)))


def rendezvous_timeout_s(config_value: float | None = None) -> float:
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_RENDEZVOUS_TIMEOUT_S if config_value is None else config_value
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise RendezvousError(f"{RENDEZVOUS_TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def init_distributed(*, rendezvous_timeout: float | None = None,
                     collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """Initialise the default process group from the launcher's environment: NCCL on GPUs, gloo on
    CPU. Safe to call twice. Raises RendezvousError when the ranks cannot meet in time."""
    if dist.is_initialized():
        return
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles a shared-memory all-reduce on first init on CPU (about a minute); it is
    # only used for inference, so we switch it off.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    apply_launcher_env()
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_PORT", "29500")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():  # more ranks than GPUs on this node: say so before anyone waits for this rank
        from megamobi.cli_support import UserError
        from megamobi.devices import check_local_rank_device

        try:
            check_local_rank_device(int(os.environ["LOCAL_RANK"]))
        except UserError as err:
            raise RendezvousError(str(err)) from None
    store = rendezvous(host=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]), rank=rank,
                       world_size=world_size, timeout_s=rendezvous_timeout_s(rendezvous_timeout),
                       collective_timeout_s=collective_timeout)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)  # wraps the group created above
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def rendezvous(*, host: str, port: int, rank: int, world_size: int, timeout_s: float,
               collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> dist.TCPStore:
    """Every rank meets at rank 0's TCP store within timeout_s; the store then serves the process group."""
    deadline = time.monotonic() + timeout_s
    where = f"{host}:{port} (MASTER_ADDR:MASTER_PORT)"
    advice = (f"within {timeout_s:g} s ({RENDEZVOUS_TIMEOUT_ENV} / launch.rendezvous_timeout_s): check that every "
              "node runs the job, that MASTER_ADDR is rank 0's node and reachable from this one, and that MASTER_PORT "
              "is the same everywhere")
    _resolve(host, port, deadline=deadline, where=where)
    if rank != 0 and not _reachable(host, port, deadline=deadline):
        raise RendezvousError(f"rank {rank} could not reach the rendezvous at {where} {advice}")
    wait = datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0))
    try:
        store = dist.TCPStore(host, port, world_size, rank == 0, timeout=wait, wait_for_workers=False)
    except (RuntimeError, OSError) as err:  # torch's DistNetworkError / DistStoreError are RuntimeErrors
        text = str(err)
        if rank == 0 and ("EADDRINUSE" in text or "address already in use" in text.lower()):
            raise RendezvousError(f"rank 0 cannot listen on MASTER_PORT {port}: the port is already in use on this node "
                                  "(another job, or a leftover process). Set MASTER_PORT to a free port") from None
        if rank == 0:
            raise RendezvousError(f"rank 0 cannot open the rendezvous at {where}: {text.splitlines()[0]}") from None
        raise RendezvousError(f"rank {rank} could not reach the rendezvous at {where} {advice}") from None
    store.add("megamobi/rendezvous", 1)
    while (arrived := store.add("megamobi/rendezvous", 0)) < world_size:
        if time.monotonic() > deadline:
            raise RendezvousError(f"only {arrived} of {world_size} ranks reached the rendezvous at {where} {advice}")
        time.sleep(0.02)
    # From now on the store serves the process group's own waits.
    store.set_timeout(datetime.timedelta(seconds=collective_timeout_s))
    return store


def _reachable(host: str, port: int, *, deadline: float) -> bool:
    """Poll rank 0's port with plain sockets (torch's own client retries print C++ stack dumps)."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(min(deadline - time.monotonic(), 5.0), 0.1)):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def _resolve(host: str, port: int, *, deadline: float, where: str) -> None:
    """Resolve MASTER_ADDR, retrying until the deadline (DNS may lag behind a fresh allocation)."""
    while True:
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            return
        except socket.gaierror as err:
            if time.monotonic() > deadline:
                raise RendezvousError(f"MASTER_ADDR {host!r} does not resolve ({err.strerror}); the rendezvous "
                                      f"{where} is unreachable. Use a host name every node resolves, or an IP "
                                      "address") from None
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))


def launch_world_size() -> int:
    """The world size this process's launcher announced (after mapping SLURM's variables); 1 alone."""
    apply_launcher_env()
    raw = os.environ.get("WORLD_SIZE", "1")
    if not raw.isdigit() or int(raw) <= 0:
        raise RendezvousError(f"WORLD_SIZE={raw!r} must be a positive whole number (the launcher sets it)")
    return int(raw)
