#!/usr/bin/env bash
# Fetch the Python wheels that the GPU test machine lacks, for ITS interpreter (CPython 3.12,
# x86-64 Linux), into bench/wheels/ (git-ignored; it travels with the working tree).
#
#   bash bench/gpu_wheels.sh            # run here, on a machine with PyPI access
#   bash bench/gpu_check.sh             # then there: installs them with --no-index (docs/performance.md)
#
# That machine has torch 2.11 (CUDA 13), triton, transformers, numpy, pyyaml, safetensors, sentencepiece,
# tqdm, psutil, ninja, msgpack, py-cpuinfo, einops and packaging; it has no network, no DeepSpeed and
# no liger-kernel. PyPI has DeepSpeed only as a source archive: `pip wheel --no-deps` turns it into a
# pure-Python wheel in seconds (its CUDA ops are JIT-built at run time and megamobi uses none).
# Environment: PYTHON (default .venv/bin/python, else python3), WHEEL_DIR (default bench/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
WHEEL_DIR=${WHEEL_DIR:-bench/wheels}
mkdir -p "$WHEEL_DIR"

# Versions pinned to what CI tests with (requirements/ci.txt and DeepSpeed 0.19.8's own needs).
BINARY=(
  liger-kernel==0.8.5
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  zstandard==0.25.0
)
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64)
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

echo "[gpu_wheels] downloading ${#BINARY[@]} wheels for CPython 3.12 x86-64 into $WHEEL_DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platform_args[@]}" -d "$WHEEL_DIR" "${BINARY[@]}"

if ! ls "$WHEEL_DIR"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  echo "[gpu_wheels] building the pure-Python DeepSpeed 0.19.8 wheel"
  # DS_BUILD_OPS=0: no CUDA op is compiled here; DeepSpeed JIT-builds what it needs there.
  DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHEEL_DIR" deepspeed==0.19.8
fi
ls -1 "$WHEEL_DIR"
du -sh "$WHEEL_DIR"
