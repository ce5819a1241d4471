"""A rendezvous that cannot happen fails in bounded time, naming host and port (never retries forever);
MASTER_PORT in use is named; the launch config keys and switches refuse bad values."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from multiproc import free_port
from run_yaml import write_run_yaml

from megamobi.config_io import ConfigError
from megamobi.distributed import RendezvousError, rendezvous
from megamobi.training.run_config import load_run_config


def _fails_within(seconds: float, **kwargs) -> str:
    start = time.monotonic()
    with pytest.raises(RendezvousError) as err:
        rendezvous(**kwargs)
    assert time.monotonic() - start < seconds
    return str(err.value)


def test_master_address_that_does_not_resolve():
    message = _fails_within(5, host="no-such-node.invalid", port=29400, rank=1, world_size=2, timeout_s=1.5)
    assert "MASTER_ADDR 'no-such-node.invalid' does not resolve" in message and "no-such-node.invalid:29400" in message


def test_master_nobody_listens_on():
    port = free_port()
    message = _fails_within(5, host="127.0.0.1", port=port, rank=1, world_size=2, timeout_s=1.5)
    assert f"rank 1 could not reach the rendezvous at 127.0.0.1:{port}" in message
    assert "within 1.5 s (MEGAMOBI_RENDEZVOUS_TIMEOUT" in message


def test_rank_that_never_arrives():
    port = free_port()
    message = _fails_within(5, host="127.0.0.1", port=port, rank=0, world_size=3, timeout_s=1.5)
    assert f"only 1 of 3 ranks reached the rendezvous at 127.0.0.1:{port}" in message


def test_master_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        message = _fails_within(2, host="127.0.0.1", port=port, rank=0, world_size=2, timeout_s=30)
    assert f"MASTER_PORT {port}" in message and "already in use" in message


def test_late_master_is_waited_for():
    """Rank 1 may start before rank 0 listens (nodes start at different times): it waits, then meets."""
    port = free_port()
    stores = {}

    def master():
        time.sleep(1.0)
        stores[0] = rendezvous(host="127.0.0.1", port=port, rank=0, world_size=2, timeout_s=20)

    thread = threading.Thread(target=master)
    thread.start()
    stores[1] = rendezvous(host="127.0.0.1", port=port, rank=1, world_size=2, timeout_s=20)
    thread.join()
    assert stores[0].add("megamobi/rendezvous", 0) == 2


def test_unresolvable_master_through_the_cli(tmp_path, token_shards):
    """The real entry point: exit status 2, one message with host and port, no traceback."""
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=8))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="no-such-node.invalid", MASTER_PORT="29401",
               MEGAMOBI_RENDEZVOUS_TIMEOUT="2", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--config", str(run_yaml)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert "MASTER_ADDR 'no-such-node.invalid' does not resolve" in out.stderr and ":29401" in out.stderr


@pytest.mark.parametrize("override, message", [
    ("launch.rendezvous_timeout_s=0", "launch.rendezvous_timeout_s 0.0 must be a positive number"),
    ("launch.rendezvous_timeout_s=-5", "launch.rendezvous_timeout_s -5.0 must be a positive number"),
    ("launch.rendezvous_timeout_s=soon", "rendezvous_timeout_s"),
    ("launch.requeue=maybe", "requeue"),
    ("launch.requeu=true", "requeu"),
])
def test_bad_launch_config_values(tmp_path, token_shards, override, message):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=8))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_run_config(run_yaml, [override])


@pytest.mark.parametrize("variable, value", [("MEGAMOBI_REQUEUE", "maybe"), ("MEGAMOBI_RENDEZVOUS_TIMEOUT", "0"),
                                             ("MEGAMOBI_RENDEZVOUS_TIMEOUT", "ten")])
def test_bad_launch_switches_stop_the_check(tmp_path, token_shards, variable, value):
    from launch_runs import make_small_run

    run_yaml = write_run_yaml(tmp_path / "run.yaml", make_small_run(tmp_path / "run", token_shards, global_batch=8))
    out = subprocess.run([sys.executable, "-m", "megamobi.pretrain", "--check-only", "--config", str(run_yaml)],
                         env={**os.environ, variable: value}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"{variable}={value!r}" in out.stderr


def _collective_with_an_absent_peer(rank: int, port: int, results) -> None:
    import torch
    import torch.distributed as dist

    from megamobi.distributed import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    init_distributed(collective_timeout=2.0)
    if rank == 1:
        time.sleep(8)  # never joins the all-reduce below
        os._exit(0)
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        results.put(("returned", time.monotonic() - start))
    except RuntimeError as err:
        results.put((str(err).splitlines()[0], time.monotonic() - start))
    os._exit(0)


def test_the_collective_timeout_reaches_the_process_group():
    """launch.collective_timeout_s is the process group's own timeout: a collective a peer never joins
    fails after it (here 2 s), not after torch's default 30 minutes."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    results, port = fork.SimpleQueue(), free_port()
    procs = [fork.Process(target=_collective_with_an_absent_peer, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    message, waited = results.get()
    for p in procs:
        p.join(timeout=30)
    assert "timed out" in message.lower() and 1.5 < waited < 7, (message, waited)
