#!/usr/bin/env bash
# Creates ./.venv with the pinned CPU stack (requirements/ci.txt) and megamobi installed editable.
# Idempotent: re-running with unchanged pins does nothing. On a GPU cluster, install the CUDA torch
# of your site first and then `pip install -e .[gpu]` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.megamobi-requirements.sha256
want=$(cat requirements/ci.txt requirements/triton-interpreter.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "megamobi: installing the pinned environment into .venv (about 2 minutes the first time)"
pip_install() {  # pip's exit status, without this machine's noisy "Location ... is ignored" warnings
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install -r requirements/ci.txt
# Triton + liger-kernel for the interpreter tests, without their dependencies (no CUDA torch).
pip_install --no-deps -r requirements/triton-interpreter.txt
pip_install --no-deps -e .
.venv/bin/python -c "import torch, deepspeed, megamobi" >/dev/null 2>&1 || { echo "megamobi: the environment failed to install; see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
