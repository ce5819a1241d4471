"""The SLURM launch path as far as a CPU machine allows: host lists, rank arithmetic, the dry run;
and one real `deepspeed` launch through launch/pretrain.sh on this machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_yaml import write_run_yaml

from megamobi.launcher import expand_nodelist, plan_from_env

REPO = Path(__file__).resolve().parents[2]
SLURM_4x8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[001-002],gpu-b[10,12]", "SLURM_NNODES": "4",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_NODEID": "2"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[08-10,15],login7", ["gpu08", "gpu09", "gpu10", "gpu15", "login7"]),
    ("a[1-2],b[3],c", ["a1", "a2", "b3", "c"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_rank_arithmetic_from_slurm_variables():
    plan = plan_from_env(SLURM_4x8)
    assert plan.hosts == ["gpu-a001", "gpu-a002", "gpu-b10", "gpu-b12"]
    assert (plan.world_size, plan.node_rank, plan.master_addr) == (32, 2, "gpu-a001")
    assert list(plan.global_ranks) == list(range(16, 24))
    assert plan.master_port == 20000 + 4242
    assert plan.hostfile() == "gpu-a001 slots=8\ngpu-a002 slots=8\ngpu-b10 slots=8\ngpu-b12 slots=8\n"
    cmd = plan.deepspeed_command(hostfile="/tmp/h", run_config="run.yaml", overrides=["train.steps=5"])
    assert cmd[:5] == ["deepspeed", "--hostfile=/tmp/h", "--no_ssh", "--node_rank=2", "--num_nodes=4"]
    assert "--master_addr=gpu-a001" in cmd and "--num_gpus=8" in cmd and cmd[-3:] == ["--config", "run.yaml", "train.steps=5"]


def test_inconsistent_slurm_environment_is_refused():
    with pytest.raises(SystemExit, match="SLURM_NNODES=3 but the node list has 4 hosts"):
        plan_from_env({**SLURM_4x8, "SLURM_NNODES": "3"})
    with pytest.raises(SystemExit, match="SLURM_JOB_NODELIST is not"):
        plan_from_env({"SLURM_JOB_ID": "1"})


def test_dry_run_prints_one_deepspeed_per_node(tmp_path, token_shards):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=64))
    env = {**os.environ, **SLURM_4x8, "MEGAMOBI_DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml), "train.steps=3"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "is valid for 32 process(es)" in lines[0]
    assert lines[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1")
    deepspeed_lines = [l for l in lines if l.startswith("deepspeed ")]
    assert [l.split("--node_rank=")[1].split()[0] for l in deepspeed_lines] == ["0", "1", "2", "3"]
    assert "# node 3 (gpu-b12): ranks 24-31" in lines


def test_dry_run_refuses_a_config_that_cannot_work_at_that_size(tmp_path, token_shards):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=8))
    env = {**os.environ, **SLURM_4x8, "MEGAMOBI_DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml)], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "global_batch_size 8 is not divisible by micro_batch_size x data-parallel size = 2 x 32" in out.stderr


def test_real_deepspeed_launch_on_this_machine(tmp_path, token_shards):
    """launch/pretrain.sh -> megamobi.launcher -> the `deepspeed` CLI -> 2 processes -> a checkpoint."""
    from launch_runs import make_small_run

    run = make_small_run(tmp_path / "run", token_shards, global_batch=8)
    run_yaml = write_run_yaml(tmp_path / "run.yaml", run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(NPROC_PER_NODE="2", PYTHON=sys.executable, MASTER_PORT=str(_free_port()))
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml), "train.steps=3"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "layout T=1 P=1 D=2" in out.stdout + out.stderr
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "step_0000003" / "megamobi.json").is_file()


def _free_port() -> int:
    from multiproc import free_port

    return free_port()
