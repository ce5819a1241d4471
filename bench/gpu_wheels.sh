#!/usr/bin/env bash
# Fetch the wheels of bench/gpu_wheels.txt (the Python packages the GPU test machine lacks) into
# bench/wheels/ (git-ignored; it travels with the working tree), for THAT machine's interpreter
# (CPython 3.12, x86-64 Linux) and for this machine's own (so that bench/gpu_rehearsal.sh can install
# the same list here).
#
#   bash bench/gpu_wheels.sh            # here, on a machine with PyPI access
#   bash bench/gpu_check.sh             # then there: installs them with --no-index (docs/performance.md)
#
# PyPI has DeepSpeed only as a source archive: `pip wheel --no-deps` turns it into a pure-Python wheel in
# seconds (its CUDA ops are JIT-built at run time and megamobi uses none).
# Environment: PYTHON (default .venv/bin/python, else python3), WHEEL_DIR (default bench/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEEL_DIR=${WHEEL_DIR:-bench/wheels}
mkdir -p "$WHEEL_DIR"
mapfile -t WANTED < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' bench/gpu_wheels.txt | grep -v '^$')
PYPI=()  # everything but DeepSpeed, which is built below
for req in "${WANTED[@]}"; do [[ $req == deepspeed==* ]] || PYPI+=("$req"); done

pip_quiet() {  # pip's exit status, without this machine's noisy "Location ... is ignored" warnings
  "$PYTHON" -m pip --disable-pip-version-check "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64)
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
here=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for version in $(printf '%s\n' 3.12 "$here" | sort -u); do
  echo "[gpu_wheels] ${#PYPI[@]} wheels for CPython $version x86-64 into $WHEEL_DIR"
  pip_quiet download --quiet --no-deps --only-binary=:all: \
    --python-version "$version" --implementation cp "${platform_args[@]}" -d "$WHEEL_DIR" "${PYPI[@]}"
done

if ! ls "$WHEEL_DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  echo "[gpu_wheels] building the pure-Python DeepSpeed 0.19.8 wheel"
  # DS_BUILD_OPS=0: no CUDA op is compiled here; DeepSpeed JIT-builds what it needs there.
  DS_BUILD_OPS=0 pip_quiet wheel --quiet --no-deps --no-build-isolation -w "$WHEEL_DIR" deepspeed==0.19.8
fi
ls -1 "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
