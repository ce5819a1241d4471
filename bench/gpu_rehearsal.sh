#!/usr/bin/env bash
# Rehearse bench/gpu_check.sh on CPU as the GPU machine will run it: a fresh venv holding only what that
# machine has (bench/gpu_machine.txt: torch, triton, transformers, numpy and what they need; no DeepSpeed,
# liger-kernel, pytest, megamobi install), then `gpu_check.sh --cpu-dry-run`, which installs bench/wheels
# exactly as the real run does (pip --no-index --no-deps --target) and runs every step tiny. A package
# missing from bench/gpu_wheels.txt fails here, not in the 15 minutes of a GPU lease.
#
#   bash bench/gpu_wheels.sh && bash bench/gpu_rehearsal.sh [OUT_DIR]     # ~5-10 minutes; not in CI
#
# Environment: BASE_PYTHON (default python3: a CPython that bench/wheels has wheels for),
# GPU_REHEARSAL_VENV (default /tmp/megamobi-gpu-rehearsal-venv; rebuilt when gpu_machine.txt changes).
set -euo pipefail
cd "$(dirname "$0")/.."
unset PYTHONPATH  # nothing of this machine's environment leaks into the rehearsal
BASE_PYTHON=${BASE_PYTHON:-python3}
VENV=${GPU_REHEARSAL_VENV:-/tmp/megamobi-gpu-rehearsal-venv}
want=$(cat bench/gpu_machine.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.gpu-machine.sha256" 2>/dev/null)" != "$want" ]; then
  echo "[gpu_rehearsal] a fresh venv in $VENV with bench/gpu_machine.txt only"
  "$BASE_PYTHON" -m venv --clear "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r bench/gpu_machine.txt 2>&1 |
    { grep -v "^WARNING: Location" || true; }
  [ "${PIPESTATUS[0]}" = 0 ] || { echo "[gpu_rehearsal] installing bench/gpu_machine.txt failed" >&2; exit 1; }
  echo "$want" > "$VENV/.gpu-machine.sha256"
fi
# What the GPU machine does NOT have must not be here either.
if "$VENV/bin/python" -c "import deepspeed" 2>/dev/null || "$VENV/bin/python" -c "import liger_kernel" 2>/dev/null ||
   "$VENV/bin/python" -c "import pytest" 2>/dev/null; then
  echo "[gpu_rehearsal] $VENV holds DeepSpeed, liger-kernel or pytest: remove it and run again" >&2; exit 1
fi
"$VENV/bin/python" -c "import torch; assert torch.version.cuda is None, torch.__version__" ||
  { echo "[gpu_rehearsal] $VENV's torch is not a CPU build" >&2; exit 1; }
PYTHON="$VENV/bin/python" bash bench/gpu_check.sh --cpu-dry-run "${1:-bench/gpu-check-out}"
