"""The launch path without processes: SLURM host lists, rank arithmetic, SLURM variables -> torch's,
the dry run of the paper's 20 x 8 job, launch environment errors. Real launches: test_real_launch.py
(this machine) and tests/slurm (a real SLURM)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostlist_cases import HOSTLISTS
from run_yaml import write_run_yaml

from megamobi.distributed import rank_env_from_slurm
from megamobi.launcher import LaunchError, expand_nodelist, plan_from_env

REPO = Path(__file__).resolve().parents[2]
SLURM_4x8 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[001-002],gpu-b[10,12]", "SLURM_NNODES": "4",
             "SLURM_GPUS_ON_NODE": "8", "SLURM_NODEID": "2"}


@pytest.mark.parametrize("nodelist, hosts", HOSTLISTS)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[1-", "gpu[3-1]", "gpu[a-b]"])
def test_broken_nodelist_is_one_clear_error(nodelist):
    with pytest.raises(LaunchError, match="cannot read the SLURM host list"):
        expand_nodelist(nodelist)


def test_rank_arithmetic_from_slurm_variables():
    plan = plan_from_env(SLURM_4x8)
    assert plan.hosts == ["gpu-a001", "gpu-a002", "gpu-b10", "gpu-b12"]
    assert (plan.world_size, plan.node_rank, plan.master_addr) == (32, 2, "gpu-a001")
    assert list(plan.global_ranks) == list(range(16, 24))
    assert plan.master_port == 20000 + 4242
    env = plan.rank_env(3)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("19", "3", "32", "gpu-a001")
    cmd = plan.rank_command(3, python="py", run_config="run.yaml", overrides=["train.steps=5"])
    assert cmd == ["py", "-u", "-m", "megamobi.pretrain", "--local_rank=3", "--config", "run.yaml", "train.steps=5"]


def test_srun_started_ranks_get_torch_variables_from_slurm():
    """`deepspeed --launcher slurm` / `srun python ...`: only SLURM's variables reach the rank."""
    step = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "4", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "node-[1-2]-ib"}
    assert rank_env_from_slurm(step) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4",
                                         "MASTER_ADDR": "node-1-ib", "MASTER_PORT": str(20000 + 77)}
    assert rank_env_from_slurm({**step, "MASTER_PORT": "31000"})["MASTER_PORT"] == "31000"
    assert rank_env_from_slurm({**step, "RANK": "0"}) == {}  # a launcher already said who this is
    batch_script = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert rank_env_from_slurm(batch_script) == {}  # the batch script itself is no rank
    with pytest.raises(LaunchError, match="WORLD_SIZE"):
        rank_env_from_slurm({**step, "SLURM_NTASKS": "x"})


def test_a_local_launch_without_master_port_gets_a_free_port():
    import socket

    ports = {plan_from_env({"NPROC_PER_NODE": "2"}).master_port for _ in range(3)}
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("", port))  # free: nothing listens there
    assert plan_from_env({"NPROC_PER_NODE": "2", "MASTER_PORT": "31234"}).master_port == 31234
    assert plan_from_env(SLURM_4x8).master_port == 20000 + 4242  # SLURM: derived from the job id, as before


def test_how_a_rank_ended_is_said_in_words():
    from megamobi.rank_failure import describe_status, failure_line

    assert describe_status(137) == "killed by SIGKILL (the out-of-memory killer, or a kill -9), exit status 137"
    assert describe_status(143) == "killed by SIGTERM, exit status 143"
    assert describe_status(1) == "exit status 1 (an error)" and describe_status(7) == "exit status 7"
    assert failure_line(local_rank=1, rank=9, status=1, last_line="RuntimeError: boom", others=7) == (
        'megamobi.launcher: rank 9 (local rank 1) failed first: exit status 1 (an error); its last line: '
        '"RuntimeError: boom"; this node\'s 7 other rank(s) were stopped after it')


def test_inconsistent_slurm_environment_is_refused():
    with pytest.raises(LaunchError, match="SLURM_NNODES=3 but the node list has 4 hosts"):
        plan_from_env({**SLURM_4x8, "SLURM_NNODES": "3"})
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not"):
        plan_from_env({"SLURM_JOB_ID": "1"})
    with pytest.raises(LaunchError, match="SLURM_NODEID='7' is not a node"):
        plan_from_env({**SLURM_4x8, "SLURM_NODEID": "7"})


@pytest.mark.parametrize("env, named", [
    ({"NPROC_PER_NODE": "abc"}, "NPROC_PER_NODE='abc'"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0'"),
    ({"NPROC_PER_NODE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ({"NPROC_PER_NODE": "2", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "gpu[1-"}, "gpu[1-"),
])
def test_launch_environment_errors_are_one_line_exit_2(tmp_path, env, named):
    """Through the real script, run from another directory without PYTHON (it finds the project's
    .venv next to itself): one message naming the variable, exit status 2, no traceback."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC", "MASTER_", "PYTHON"))}
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), "run.yaml"], env={**base, **env},
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and named in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_logs_folder_is_in_the_repository():
    """sbatch opens --output=logs/%x-%j.out before the script runs: a fresh clone must have logs/."""
    tracked = subprocess.run(["git", "ls-files", "logs"], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert tracked == ["logs/.gitignore"]
    assert "--output=logs/%x-%j.out" in (REPO / "launch/pretrain.sh").read_text()


def test_dry_run_prints_the_papers_20_x_8_job(tmp_path, token_shards):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=320))
    env = {**os.environ, "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "gpu[001-020]", "SLURM_NNODES": "20",
           "SLURM_GPUS_ON_NODE": "8", "MEGAMOBI_DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml), "train.steps=3"], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "is valid for 160 process(es)" in lines[0]
    assert lines[1].startswith("srun --ntasks-per-node=1 --kill-on-bad-exit=1")
    assert lines[2] == "# SLURM, 20 nodes x 8 processes = world size 160; master gpu001:20001"
    assert [l for l in lines if l.startswith("# node ")][-1] == "# node 19 (gpu020): ranks 152-159"
    last_rank = [l for l in lines if l.startswith("RANK=159 ")]
    assert len(last_rank) == 1 and "LOCAL_RANK=7 WORLD_SIZE=160 MASTER_ADDR=gpu001 MASTER_PORT=20001" in last_rank[0]
    assert last_rank[0].endswith("-m megamobi.pretrain --local_rank=7 --config " + str(run_yaml) + " train.steps=3")


def test_dry_run_refuses_a_config_that_cannot_work_at_that_size(tmp_path, token_shards):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=8))
    env = {**os.environ, **SLURM_4x8, "MEGAMOBI_DRY_RUN": "1", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "launch/pretrain.sh"), str(run_yaml)], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert "global_batch_size 8 is not divisible by micro_batch_size x data-parallel size = 2 x 32" in out.stderr


def test_early_stop_without_requeue_says_what_to_do(monkeypatch, capsys):
    from megamobi.training.early_stop import finish_early_stop

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    status = finish_early_stop(signal_name="SIGUSR1", step=7, checkpoint=Path("run/checkpoints/step_0000007"),
                               requeue=False, is_rank0=True)
    line = capsys.readouterr().out.strip()
    assert status == 75
    assert line == ("megamobi: stopped early by SIGUSR1 at step 7 after saving run/checkpoints/step_0000007; "
                    "launch.requeue is off: resubmit the same command to continue (exit status 75)")
    assert finish_early_stop(signal_name="SIGTERM", step=7, checkpoint=None, requeue=True, is_rank0=False) == 75
    assert capsys.readouterr().out == ""  # only rank 0 speaks; a SIGTERM never requeues
