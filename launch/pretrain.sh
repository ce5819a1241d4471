#!/usr/bin/env bash
# megamobi pretraining launcher: submit with sbatch, or run on one machine.
#
#   sbatch launch/pretrain.sh configs/pretrain-mobillama-0.5b.yaml [key.sub=value ...]
#   bash launch/pretrain.sh configs/pretrain-tiny-cpu.yaml            # this machine (CPU or GPUs)
#   MEGAMOBI_DRY_RUN=1 bash launch/pretrain.sh RUN.yaml              # print the commands, run nothing
#
# Under SLURM: one `deepspeed` launcher per node through srun (no ssh, pdsh or hostfile to write by
# hand), the first node as master. SLURM sends SIGUSR1 10 minutes before the time limit: every
# rank finishes its step, a checkpoint is saved, and resubmitting the same command resumes it.
# Environment: NPROC_PER_NODE (default: the node's GPUs, or 2 on CPU), PYTHON (default .venv/bin/python).
# See docs/launch.md.
#
#SBATCH --job-name=megamobi
#SBATCH --nodes=20
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --signal=USR1@600
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
# sbatch runs a copy of this script from a spool directory: work from where the job was submitted.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs
RUN_CONFIG=$1
shift
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PATH="$(dirname "$PYTHON"):$PATH"   # the venv's `deepspeed` launcher

# Check the config for the world size the launch will have, before asking for any process.
WORLD_SIZE=$("$PYTHON" -c 'from megamobi.launcher import plan_from_env; print(plan_from_env().world_size)') \
  "$PYTHON" -m megamobi.pretrain --check-only --config "$RUN_CONFIG" "$@"

if [ -n "${MEGAMOBI_DRY_RUN:-}" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MEGAMOBI_LOCAL:-}" ]; then
    echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 $PYTHON -m megamobi.launcher node $RUN_CONFIG $*"
  fi
  exec "$PYTHON" -m megamobi.launcher plan "$RUN_CONFIG" "$@"
fi
if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${MEGAMOBI_LOCAL:-}" ]; then
  exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 "$PYTHON" -m megamobi.launcher node "$RUN_CONFIG" "$@"
fi
exec "$PYTHON" -m megamobi.launcher node "$RUN_CONFIG" "$@"
