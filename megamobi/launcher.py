"""Per-node launch logic behind launch/pretrain.sh: SLURM's variables -> this node's training ranks.

Under SLURM, `srun --ntasks-per-node=1` runs `python -m megamobi.launcher node RUN.yaml ...` once on
every node. Each reads SLURM's own variables (no scontrol, ssh, pdsh or hostfile needed), takes the
first node as master and starts this node's ranks, each `python -u -m megamobi.pretrain
--local_rank=K --config RUN.yaml ...` with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set, as
DeepSpeed's per-node launcher would. Outside SLURM it starts NPROC_PER_NODE ranks on this machine, on
MASTER_PORT or else a free port (as `torchrun --standalone` does), so two local runs never collide.

    python -m megamobi.launcher plan RUN.yaml [overrides]    # print what every node would run
    python -m megamobi.launcher node RUN.yaml [overrides]    # run this node's ranks
    python -m megamobi.launcher world-size                   # the world size the launch will have

Unlike DeepSpeed's per-node launcher (which kills its ranks 30 s after a SIGTERM), this one forwards
SIGTERM and SIGUSR1 to its ranks and waits for them however long their checkpoint takes; SIGUSR1 is
SLURM's time-limit warning. Its ranks never outlive it: each watches this process (MEGAMOBI_LAUNCHER_PID,
megamobi/parent_watch.py) and, if it dies even by SIGKILL, saves a checkpoint and stops; on one machine
it watches launch/pretrain.sh the same way. Exit status: the ranks' (see megamobi/exit_codes.py); after
a failure the last line names the rank that failed first and why (megamobi/rank_failure.py).

Global ranks follow DeepSpeed: node n runs ranks n*G .. n*G+G-1 (G processes per node), local
rank = rank - n*G.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

from megamobi.config_io import ConfigError
from megamobi.exit_codes import FAILED, STOPPED_AFTER_SAVE, USAGE
from megamobi.parent_watch import LAUNCHER_PID_ENV, watch_launch_script
from megamobi.rank_failure import RankStderr, failure_line


class LaunchError(ConfigError):
    """A launch environment that cannot work (NPROC_PER_NODE=abc, a broken SLURM host list, ...)."""


@dataclasses.dataclass(frozen=True)
class NodePlan:
    hosts: list[str]
    node_rank: int
    procs_per_node: int
    master_addr: str
    master_port: int
    slurm: bool

    @property
    def world_size(self) -> int:
        return len(self.hosts) * self.procs_per_node

    @property
    def global_ranks(self) -> range:
        start = self.node_rank * self.procs_per_node
        return range(start, start + self.procs_per_node)

    def rank_env(self, local_rank: int) -> dict[str, str]:
        return {"RANK": str(self.global_ranks[local_rank]), "LOCAL_RANK": str(local_rank),
                "WORLD_SIZE": str(self.world_size), "LOCAL_SIZE": str(self.procs_per_node),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
                "CROSS_RANK": str(self.node_rank), "CROSS_SIZE": str(len(self.hosts))}

    def rank_command(self, local_rank: int, *, python: str, run_config: str, overrides: list[str]) -> list[str]:
        return [python, "-u", "-m", "megamobi.pretrain", f"--local_rank={local_rank}", "--config", run_config,
                *overrides]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, the whole grammar (python-hostlist): 'gpu[001-003,007],login1',
    'node-[1-2]-ib', 'r[1-2]n[01-02]' -> one name per host, in SLURM's order."""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as err:
        raise LaunchError(f"cannot read the SLURM host list {nodelist!r}: {err}") from None
    if not hosts:
        raise LaunchError(f"the SLURM host list {nodelist!r} names no host")
    return hosts


def slurm_master_port(job_id: str) -> int:
    """Derived from the job id so that two jobs sharing a node do not collide."""
    if not str(job_id).isdigit():
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a number; set MASTER_PORT explicitly")
    return 20000 + int(job_id) % 20000


def _positive_int(env: dict[str, str], key: str, *, what: str) -> int:
    raw = env[key]
    value = raw.split(":")[-1].split("(")[0]  # SLURM_GPUS_ON_NODE can read "a100:8"
    if not value.isdigit() or int(value) <= 0:
        raise LaunchError(f"{key}={raw!r}: {what} must be a positive whole number")
    return int(value)


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _procs_per_node(env: dict[str, str]) -> int:
    if env.get("NPROC_PER_NODE"):
        return _positive_int(env, "NPROC_PER_NODE", what="the number of processes per node")
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key) and env[key].split(":")[-1] not in ("0", ""):
            return _positive_int(env, key, what="the GPUs per node")
    return _cuda_devices() or 2  # CPU: two processes, enough to exercise data parallelism


def free_local_port() -> int:
    """A port nobody listens on now, the kernel's choice (what `torchrun --standalone` does); rank 0
    binds it within seconds, a race as small as torchrun's."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _port(env: dict[str, str], default) -> int:
    """MASTER_PORT when set, else default() (only called when needed)."""
    raw = env.get("MASTER_PORT")
    if not raw:
        return default()
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise LaunchError(f"MASTER_PORT={raw!r} must be a TCP port number (1-65535)")
    return int(raw)


def plan_from_env(env: dict[str, str] | None = None) -> NodePlan:
    env = dict(os.environ if env is None else env)
    slurm = bool(env.get("SLURM_JOB_ID")) and not env.get("MEGAMOBI_LOCAL")
    procs = _procs_per_node(env)
    if not slurm:
        return NodePlan(hosts=["localhost"], node_rank=0, procs_per_node=procs, master_addr="127.0.0.1",
                        master_port=_port(env, free_local_port), slurm=False)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; run inside an allocation "
                          "(or set MEGAMOBI_LOCAL=1 to launch on this machine only)")
    hosts = expand_nodelist(nodelist)
    if env.get("SLURM_NNODES") and env["SLURM_NNODES"] != str(len(hosts)):
        raise LaunchError(f"SLURM_NNODES={env['SLURM_NNODES']} but the node list has {len(hosts)} hosts")
    node_id = env.get("SLURM_NODEID", "0")  # unset on the login node (dry runs): node 0
    node_rank = int(node_id) if node_id.isdigit() else -1
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"SLURM_NODEID={env.get('SLURM_NODEID')!r} is not a node of {nodelist} ({len(hosts)} hosts)")
    return NodePlan(hosts=hosts, node_rank=node_rank, procs_per_node=procs, master_addr=env.get("MASTER_ADDR") or hosts[0],
                    master_port=_port(env, lambda: slurm_master_port(env["SLURM_JOB_ID"])), slurm=True)


def print_plan(plan: NodePlan, *, python: str, run_config: str, overrides: list[str]) -> None:
    mode = f"SLURM, {len(plan.hosts)} nodes" if plan.slurm else "local"
    print(f"# {mode} x {plan.procs_per_node} processes = world size {plan.world_size}; "
          f"master {plan.master_addr}:{plan.master_port}")
    for node_rank, host in enumerate(plan.hosts):
        node = dataclasses.replace(plan, node_rank=node_rank)
        ranks = node.global_ranks
        print(f"# node {node_rank} ({host}): ranks {ranks.start}-{ranks.stop - 1}")
        for local in (0, plan.procs_per_node - 1) if plan.procs_per_node > 1 else (0,):
            env = " ".join(f"{k}={v}" for k, v in node.rank_env(local).items() if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                                                                         "MASTER_ADDR", "MASTER_PORT"))
            print(f"{env} {shlex.join(node.rank_command(local, python=python, run_config=run_config, overrides=overrides))}")


class NodeRanks:
    """This node's rank processes: started together, signals forwarded, a failed rank stops the others."""

    FAILED_RANK_GRACE_S = 30  # a rank that failed may leave the others blocked in a collective

    def __init__(self, plan: NodePlan, *, python: str, run_config: str, overrides: list[str], env: dict[str, str]):
        # Own session: a Ctrl-C in the terminal reaches the launcher only, which asks the ranks to save.
        self.procs = [subprocess.Popen(plan.rank_command(k, python=python, run_config=run_config, overrides=overrides),
                                       env={**env, **plan.rank_env(k), LAUNCHER_PID_ENV: str(os.getpid())},
                                       start_new_session=True,
                                       preexec_fn=_ignore_usr1, stderr=subprocess.PIPE)
                      for k in range(plan.procs_per_node)]
        self.stderr = [RankStderr(proc.stderr) for proc in self.procs]  # passed through; the last lines kept
        self.global_ranks = plan.global_ranks
        self.first_failure: int | None = None
        self.interrupts = 0
        self.first_interrupt = 0.0

    def forward(self, signum, frame) -> None:
        """SIGTERM / SIGUSR1 / SIGINT reach every rank as they are (the log names the signal the user
        sent); each saves a checkpoint and exits. No deadline
        here: under SLURM the job's KillWait (or the time limit) is the only bound. A second Ctrl-C
        kills the ranks (the save in progress is abandoned; the previous checkpoint stays intact)."""
        if signum == signal.SIGINT:
            # A terminal's Ctrl-C reaches both launch/pretrain.sh (which passes it on) and this process:
            # count interrupts at least a second apart.
            now = time.monotonic()
            if self.interrupts and now - self.first_interrupt < 1.0:
                return
            self.interrupts += 1
            self.first_interrupt = self.first_interrupt or now
            if self.interrupts == 1:
                print("megamobi.launcher: interrupted: the ranks save a checkpoint and stop (Ctrl-C again to kill "
                      "them without saving)", file=sys.stderr, flush=True)
        for proc in self.procs:
            if proc.poll() is None:
                if signum == signal.SIGINT and self.interrupts > 1:
                    proc.kill()
                else:
                    proc.send_signal(signum)

    def wait(self) -> int:
        codes: dict[int, int] = {}
        while len(codes) < len(self.procs):
            for k, proc in enumerate(self.procs):
                if k not in codes and proc.poll() is not None:
                    codes[k] = _exit_status(proc.returncode)
                    if codes[k] not in (0, STOPPED_AFTER_SAVE):
                        self._stop_after_failure(failed=k)
            time.sleep(0.2)
        failures = [c for c in codes.values() if c not in (0, STOPPED_AFTER_SAVE)]
        if failures:
            first = self.first_failure if self.first_failure is not None else next(
                k for k, c in codes.items() if c not in (0, STOPPED_AFTER_SAVE))
            print(failure_line(local_rank=first, rank=self.global_ranks[first], status=codes[first],
                               last_line=self.stderr[first].last_line(), others=len(self.procs) - 1),
                  file=sys.stderr, flush=True)
            return codes[first]
        return STOPPED_AFTER_SAVE if STOPPED_AFTER_SAVE in codes.values() else 0

    def _stop_after_failure(self, *, failed: int) -> None:
        if self.first_failure is None:
            self.first_failure = failed
        print(f"megamobi.launcher: local rank {failed} exited with status {_exit_status(self.procs[failed].returncode)}; "
              "stopping this node's other ranks", file=sys.stderr, flush=True)
        for proc in self.procs:
            if proc.poll() is None and _is_stopped(proc.pid):
                proc.kill()  # a stopped rank (SIGSTOP: what a hang report names) can neither save nor exit
            elif proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + self.FAILED_RANK_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ignore_usr1() -> None:
    """In each rank before exec: SIGUSR1's default action is to exit, and SLURM's warning may come while
    a rank is still starting; megamobi.pretrain installs its own handler (save and stop) once it can."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _is_stopped(pid: int) -> bool:
    """True when the process is stopped (state T in /proc; Linux only, False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N, as a shell says


def run_node(plan: NodePlan, *, run_config: str, overrides: list[str], env: dict[str, str]) -> int:
    env = dict(env)
    env.setdefault("OMP_NUM_THREADS", "1")  # like DeepSpeed's launcher leaves it, one thread per rank on CPU
    if _cuda_devices() == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of a warning from every process
    ranks = NodeRanks(plan, python=sys.executable, run_config=run_config, overrides=overrides, env=env)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, ranks.forward)

    def script_gone(why: str) -> None:
        print(f"megamobi.launcher: {why}: the ranks save a checkpoint and stop", file=sys.stderr, flush=True)
        ranks.forward(signal.SIGTERM, None)

    watch_launch_script(script_gone)  # launch/pretrain.sh killed by SIGKILL: it could forward nothing
    return ranks.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):  # asked for: exit 0 (a wrong invocation below exits 2)
        print(__doc__)
        return 0
    try:
        if argv[:1] == ["world-size"]:
            print(plan_from_env().world_size)
            return 0
        if len(argv) < 2 or argv[0] not in ("plan", "node"):
            print(__doc__, file=sys.stderr)
            return USAGE
        action, run_config, overrides = argv[0], argv[1], argv[2:]
        plan = plan_from_env()
    except LaunchError as err:
        print(f"megamobi.launcher: error: {err}", file=sys.stderr)
        return USAGE
    if action == "plan":
        print_plan(plan, python=sys.executable, run_config=run_config, overrides=overrides)
        return 0
    try:
        return run_node(plan, run_config=run_config, overrides=overrides, env=dict(os.environ))
    except OSError as err:
        print(f"megamobi.launcher: error: cannot start the ranks: {err}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
