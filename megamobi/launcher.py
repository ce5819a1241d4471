"""Per-node launch logic behind launch/pretrain.sh: SLURM's variables -> one `deepspeed` per node.

Under SLURM, `srun --ntasks-per-node=1` runs `python -m megamobi.launcher node RUN.yaml ...` once on
every node. Each reads SLURM's own variables (no scontrol, ssh or pdsh needed), writes the same
DeepSpeed hostfile, and execs `deepspeed --no_ssh --node_rank=<this node>` with the first node as
master. Outside SLURM it execs a plain local `deepspeed --num_gpus N`.

    python -m megamobi.launcher plan RUN.yaml [overrides]    # print what every node would run
    python -m megamobi.launcher node RUN.yaml [overrides]    # run this node's launcher

Global ranks follow DeepSpeed: node n runs ranks n*G .. n*G+G-1 (G processes per node), local
rank = rank - n*G.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import signal
import sys
from pathlib import Path


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

    def hostfile(self) -> str:
        return "".join(f"{host} slots={self.procs_per_node}\n" for host in self.hosts)

    def deepspeed_command(self, *, hostfile: str, run_config: str, overrides: list[str]) -> list[str]:
        cmd = ["deepspeed"]
        if self.slurm:
            cmd += [f"--hostfile={hostfile}", "--no_ssh", f"--node_rank={self.node_rank}",
                    f"--num_nodes={len(self.hosts)}"]
        cmd += [f"--num_gpus={self.procs_per_node}", f"--master_addr={self.master_addr}", "--log_level=warning",
                f"--master_port={self.master_port}", "--module", "megamobi.pretrain", "--config", run_config, *overrides]
        return cmd


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, e.g. 'gpu[001-003,007],login1' -> ['gpu001', 'gpu002', 'gpu003', 'gpu007', 'login1']."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            if not last:
                hosts.append(prefix + first)
                continue
            width = len(first)  # keep zero padding: 001-010
            hosts.extend(f"{prefix}{i:0{width}d}" for i in range(int(first), int(last) + 1))
    return hosts


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _procs_per_node(env: dict[str, str]) -> int:
    if env.get("NPROC_PER_NODE"):
        return int(env["NPROC_PER_NODE"])
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        if value:
            return int(value.split(":")[-1])  # "a100:8" -> 8
    return _cuda_devices() or 2  # CPU: two processes, enough to exercise data parallelism


def plan_from_env(env: dict[str, str] | None = None) -> NodePlan:
    env = dict(os.environ if env is None else env)
    slurm = bool(env.get("SLURM_JOB_ID")) and not env.get("MEGAMOBI_LOCAL")
    procs = _procs_per_node(env)
    if not slurm:
        return NodePlan(hosts=["localhost"], node_rank=0, procs_per_node=procs, master_addr="127.0.0.1",
                        master_port=int(env.get("MASTER_PORT", 29500)), slurm=False)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SystemExit("megamobi.launcher: SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not; run inside an allocation")
    hosts = expand_nodelist(nodelist)
    if env.get("SLURM_NNODES") and int(env["SLURM_NNODES"]) != len(hosts):
        raise SystemExit(f"megamobi.launcher: SLURM_NNODES={env['SLURM_NNODES']} but the node list has {len(hosts)} hosts")
    # The port is derived from the job id so that two jobs sharing a node do not collide.
    port = int(env.get("MASTER_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return NodePlan(hosts=hosts, node_rank=int(env.get("SLURM_NODEID", 0)), procs_per_node=procs,
                    master_addr=hosts[0], master_port=port, slurm=True)


def _hostfile_path(env: dict[str, str]) -> str:
    return str(Path(env.get("TMPDIR", "/tmp")) / f"megamobi-hostfile-{env.get('SLURM_JOB_ID', 'local')}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("plan", "node"):
        print(__doc__, file=sys.stderr)
        return 2
    action, run_config, overrides = argv[0], argv[1], argv[2:]
    env = dict(os.environ)
    plan = plan_from_env(env)
    hostfile = _hostfile_path(env)
    if action == "plan":
        mode = f"SLURM, {len(plan.hosts)} nodes" if plan.slurm else "local"
        print(f"# {mode} x {plan.procs_per_node} processes = world size {plan.world_size}; master {plan.master_addr}:{plan.master_port}")
        for node_rank, host in enumerate(plan.hosts):
            node = dataclasses.replace(plan, node_rank=node_rank)
            cmd = node.deepspeed_command(hostfile=hostfile, run_config=run_config, overrides=overrides)
            print(f"# node {node_rank} ({host}): ranks {node.global_ranks.start}-{node.global_ranks.stop - 1}")
            print(shlex.join(cmd))
        return 0
    if plan.slurm:
        Path(hostfile).write_text(plan.hostfile())
    env.setdefault("OMP_NUM_THREADS", "1")  # DeepSpeed's launcher leaves it unset on CPU
    if not plan.slurm and _cuda_devices() == 0:
        env.setdefault("DS_ACCELERATOR", "cpu")  # say it, instead of a warning from every process
    # SLURM's --signal=USR1@T reaches every process of the step. The launchers must survive it (its
    # default action is to exit); megamobi.pretrain installs its own handler and saves a checkpoint.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cmd = plan.deepspeed_command(hostfile=hostfile, run_config=run_config, overrides=overrides)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    sys.exit(main())
