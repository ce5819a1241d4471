#!/usr/bin/env bash
# megamobi pretraining launcher: submit with sbatch, run on one machine, or hand to deepspeed.
#
#   sbatch launch/pretrain.sh configs/pretrain-mobillama-0.5b.yaml [key.sub=value ...]
#   bash launch/pretrain.sh configs/pretrain-tiny-cpu.yaml         # this machine (CPU or GPUs)
#   deepspeed launch/pretrain.sh RUN.yaml [key.sub=value ...]      # DeepSpeed's launchers, on every rank
#   MEGAMOBI_DRY_RUN=1 bash launch/pretrain.sh RUN.yaml           # print the commands, run nothing
#
# Paths on the command line and in the run config are relative to where you run it (under sbatch:
# where you submitted). Under SLURM: one megamobi.launcher per node through srun (no ssh or hostfile),
# the first node as master. SLURM sends SIGUSR1 10 minutes before the time limit: the ranks save a
# checkpoint and the job requeues itself (launch.requeue). Exit status 75 = stopped after a clean save.
# Environment: NPROC_PER_NODE (default: the node's GPUs, or 2 on CPU), PYTHON (default: the .venv
# next to this script), MASTER_PORT, MEGAMOBI_REQUEUE=0|1, MEGAMOBI_RENDEZVOUS_TIMEOUT (seconds).
# See docs/launch.md.
#
#SBATCH --job-name=megamobi
#SBATCH --nodes=20
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=USR1@600
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
""":"
# ---- bash (and sbatch) run this part; Python reads it as a string. No backslashes or triple quotes here.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,16p' "$0" | cut -c3- >&2
  exit 2
fi
if [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,16p' "$0" | cut -c3-
  exit 0
fi

# The project: next to this script, except under sbatch, which runs a copy from its spool directory.
repo=${MEGAMOBI_HOME:-$(cd "$(dirname "$0")/.." && pwd)}
if [ ! -d "$repo/megamobi" ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v scontrol >/dev/null; then
  script=$(scontrol show job "$SLURM_JOB_ID" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^Command=/) { sub(/^Command=/, "", $i); print $i } }')
  case "$script" in /*) ;; *) script="${SLURM_SUBMIT_DIR:-.}/$script" ;; esac
  repo=$(cd "$(dirname "$script")/.." 2>/dev/null && pwd) || true
fi
if [ ! -d "$repo/megamobi" ]; then
  echo "launch/pretrain.sh: error: cannot find the megamobi project next to $0; set MEGAMOBI_HOME to its folder" >&2
  exit 2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
RUN_CONFIG=$1
shift
# No cd: the run config, run_dir and data.paths stay relative to the user's directory.

# Check the config for the world size the launch will have, before asking for any process.
world_size=$("$PYTHON" -m megamobi.launcher world-size) || exit $?
# Only its first line ("... is valid for N process(es)"): the ranks print the run's schedule when they start.
checked=$(WORLD_SIZE=$world_size "$PYTHON" -m megamobi.pretrain --check-only --config "$RUN_CONFIG" "$@") || exit $?
case $checked in *" is already complete: "*) tail -n 1 <<<"$checked"; exit 0 ;; esac  # a finished run: say so, start no rank
head -n 1 <<<"$checked"

in_slurm=""
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MEGAMOBI_LOCAL:-}" ]; then in_slurm=1; fi
if [ -n "${MEGAMOBI_DRY_RUN:-}" ]; then
  if [ -n "$in_slurm" ]; then
    echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 $PYTHON -m megamobi.launcher node $RUN_CONFIG $*"
  fi
  exec "$PYTHON" -m megamobi.launcher plan "$RUN_CONFIG" "$@"
fi

# Run the node launcher(s), pass on SIGTERM / SIGUSR1 / SIGINT sent to this script, and end with a line
# that says how the run ended (exit statuses: megamobi/exit_codes.py).
run_and_report() {
  "$@" &
  child=$!
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM
  trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
  trap 'kill -INT "$child" 2>/dev/null || true' INT
  while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
  status=0
  wait "$child" || status=$?
  case $status in
    0) ;;
    2) ;;  # a user error, already explained in one line
    74) echo "launch/pretrain.sh: a checkpoint could not be saved (exit status 74): the line above names the path and the free space; \`latest\` still names the previous checkpoint: make room (or fix the mount) and run the same command" >&2 ;;
    75) echo "launch/pretrain.sh: the run stopped early, after a clean checkpoint save (exit status 75); run the same command again (or let the requeued job start) to continue" ;;
    76) echo "launch/pretrain.sh: the run hung and was stopped (exit status 76): the line above names the rank(s); stacks in the run_dir's logs/hang-*/; the newest checkpoint is intact" >&2 ;;
    *) echo "launch/pretrain.sh: the run failed (exit status $status); the newest complete checkpoint in its run_dir is intact; the launcher's line above names the rank that failed first and why (without such a line, megamobi.launcher itself was killed: its ranks save a checkpoint and stop on their own)" >&2 ;;
  esac
  return "$status"
}
if [ -n "$in_slurm" ]; then
  run_and_report srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m megamobi.launcher node "$RUN_CONFIG" "$@" || exit $?
  exit 0
fi
export MEGAMOBI_SCRIPT_PID=$$  # the launcher watches this script: a SIGKILL here still stops the ranks
run_and_report "$PYTHON" -m megamobi.launcher node "$RUN_CONFIG" "$@" || exit $?
exit 0
":"""
# ---- Python: `deepspeed launch/pretrain.sh ...` runs `python -u launch/pretrain.sh [--local_rank=K] ...`
# on every rank; start megamobi.pretrain with the same arguments.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megamobi.launch_script import main  # noqa: E402

sys.exit(main())
