#!/usr/bin/env bash
# Every GPU figure of issue 9 in one go, on a fresh one-GPU machine without network, in under 8 minutes.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # figures to OUT_DIR (default: $OUT, else bench/gpu-check-out)
#   bash bench/gpu_check.sh --cpu-dry-run [OUT_DIR]   # the same steps, tiny, on CPU (bench/gpu_rehearsal.sh
#                                                     # runs it in a venv holding only what the GPU machine has)
#
# Needs bench/wheels/ from `bash bench/gpu_wheels.sh` (the packages of bench/gpu_wheels.txt, which the GPU
# machine lacks), which travels with the working tree. Steps, most valuable first (a step that would
# outrun the budget is cut short, and the ones after it are skipped), each bounded by a timeout and
# recorded even when it fails:
#   1. install bench/gpu_wheels.txt with pip --no-index --no-deps --target (no system site-packages is
#      touched, so an externally managed Python (PEP 668) is no obstacle); record the environment -> env.txt
#   2. a short real launch/pretrain.sh run (configs/pretrain-gpu-check.yaml: DeepSpeed ZeRO-1, bf16, NCCL,
#      1 GPU, no final checkpoint) on synthetic shards; the Trainer's tokens/s and MFU
#                                                            -> pretrain.log, pretrain_summary.json, pretrain_metrics.jsonl
#   3. bench/throughput.py for mobillama-0.5b at seq 2048, bf16: megamobi vs Hugging Face  -> throughput.jsonl/.txt
#   4. the fused-path tests against the plain path (GPU-only ones included)           -> tests.txt
#   5. more of bench/throughput.py: --trainer, kernels plain, other micro-batch sizes, selective
#      checkpointing, compile (slowest last)                                           -> throughput.jsonl/.txt
# The whole script keeps to GPU_CHECK_BUDGET_S (default 465 s). It exits 1 if a step failed; steps
# skipped for time are named in its last line.
# Environment: PYTHON (default python3), GPU_CHECK_WORK (scratch folder, default /tmp/megamobi-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [ "${1:-}" = "--cpu-dry-run" ]; then DRY_RUN=1; shift; fi
OUT_DIR=${1:-${OUT:-bench/gpu-check-out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-$(command -v python3)}
WORK=${GPU_CHECK_WORK:-/tmp/megamobi-gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK"
export PYTHONUNBUFFERED=1
LOG="$OUT_DIR/gpu_check.log"
: > "$LOG"
FAILED=()
SKIPPED=()

exec 3>&2  # the terminal's stderr, kept for say(): steps redirect their own output into figure files
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&3; }
BUDGET_S=${GPU_CHECK_BUDGET_S:-$([ $DRY_RUN = 1 ] && echo 3600 || echo 465)}  # the GPU run stays under 8 minutes
# The dry run checks that every step works, not how fast: on a shared CPU its steps get 4x the GPU limits.
LIMIT_SCALE=$([ $DRY_RUN = 1 ] && echo 4 || echo 1)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log the outcome, carry on either way
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ $left -lt 30 ]; then
    say "skip $name: the ${BUDGET_S} s budget is spent"
    SKIPPED+=("$name")
    return 0
  fi
  if [ $limit -gt $left ]; then limit=$left; fi
  say "start $name (limit $limit s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  say "end $name: exit $rc after $((SECONDS - t0)) s"
  if [ $rc -ne 0 ]; then FAILED+=("$name (exit $rc)"); fi
  return 0
}

if [ $DRY_RUN = 1 ]; then
  say "CPU dry run: the same steps with the tiny model, fp32, a few steps"
  CONFIG=tiny; SEQ=128; MICRO_BATCHES="2"; STEPS=2; WARMUP=1; PEAK=""
  BENCH_EXTRA=(--compile-backend aot_eager); NPROC=1
  LAUNCH_OVERRIDES=(model=tiny batch.seq_len=128 batch.micro_batch_size=2 batch.global_batch_size=2
                    precision=fp32 train.steps=4 train.log_interval=1 optimizer.warmup_steps=1 logging.peak_tflops=null)
  SHARD_SAMPLES=8; SHARD_VOCAB=4096
else
  CONFIG=mobillama-0.5b; SEQ=2048; MICRO_BATCHES="4 8 16"; STEPS=6; WARMUP=2; PEAK="--peak-tflops 989"
  BENCH_EXTRA=(); NPROC=1
  LAUNCH_OVERRIDES=()
  SHARD_SAMPLES=256; SHARD_VOCAB=32000
fi

# --- 1. wheels and environment ---------------------------------------------------------------------
# Exactly the list of bench/gpu_wheels.txt, each wheel as it is (--no-deps: the machine's own torch, numpy,
# ... stay), into a folder of our own put on PYTHONPATH: the same on the GPU machine and in the rehearsal.
if ! ls bench/wheels/deepspeed-*.whl >/dev/null 2>&1; then
  say "bench/wheels/ has no DeepSpeed wheel: run 'bash bench/gpu_wheels.sh' on a machine with PyPI first (and carry bench/wheels)"
fi
step wheels 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-cache-dir \
  --find-links bench/wheels --target "$WORK/site" -r bench/gpu_wheels.txt
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u; uname -a; nvidia-smi 2>/dev/null || echo "nvidia-smi: not available"
  "$PYTHON" - <<'PY'
import importlib, importlib.metadata, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("transformers", "triton", "deepspeed", "liger_kernel", "flash_attn", "pydantic", "pytest"):
    try:
        module = importlib.import_module(name)
        try:
            print(name, importlib.metadata.version(name.replace("_", "-")))
        except importlib.metadata.PackageNotFoundError:
            print(name, getattr(module, "__version__", "installed"))
    except Exception as err:  # an absent optional kernel is a fact to record, not a failure
        print(name, "unavailable:", type(err).__name__, str(err)[:120])
import os, sysconfig
include = sysconfig.get_paths()["include"]  # Triton compiles a C launcher against Python.h
print("Python.h", "present" if os.path.isfile(os.path.join(include, "Python.h")) else "MISSING", "in", include)
PY
  # Triton (its launchers) and Inductor compile C: without a compiler they fail at the first kernel.
  for cc in ${CC:+"$CC"} cc gcc clang; do
    if command -v "$cc" >/dev/null; then echo "C compiler $cc: $(command -v "$cc"): $("$cc" --version 2>&1 | head -n 1)"
    else echo "C compiler $cc: not found"; fi
  done
} > "$OUT_DIR/env.txt" 2>&1
say "environment: $(grep -m1 '^python' "$OUT_DIR/env.txt"); $(grep -m1 '^C compiler [a-z]*: /' "$OUT_DIR/env.txt" || echo 'NO C compiler')"

# --- 2. a short real run through launch/pretrain.sh (the Trainer's own figures) -------------------------
step shards 60 "$PYTHON" bench/synthetic_shards.py --output "$WORK/shards" --samples $SHARD_SAMPLES --vocab-size $SHARD_VOCAB
step pretrain 180 env NPROC_PER_NODE=$NPROC PYTHON="$PYTHON" bash launch/pretrain.sh configs/pretrain-gpu-check.yaml \
  run_dir="$WORK/run" "data.paths=[$WORK/shards]" "${LAUNCH_OVERRIDES[@]}" > "$OUT_DIR/pretrain.log" 2>&1
cp "$WORK/run/metrics.jsonl" "$OUT_DIR/pretrain_metrics.jsonl" 2>/dev/null  # for `python -m megamobi.plan --for-run`
"$PYTHON" - "$WORK/run/metrics.jsonl" "$OUT_DIR/pretrain_summary.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
path, out = Path(sys.argv[1]), Path(sys.argv[2])
lines = [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
steps = [m for m in lines if "tokens_per_s" in m]
later = steps[1:] or steps  # the first logged window holds the warm-up
def mean(key):
    values = [m[key] for m in later if m.get(key) is not None]
    return sum(values) / len(values) if values else None
summary = {"logged_steps": [m["step"] for m in steps], "tokens_per_s": mean("tokens_per_s"),
           "tokens_per_s_per_device": mean("tokens_per_s_per_device"), "tflops_per_device": mean("tflops_per_device"),
           "mfu": mean("mfu"), "memory_gb": max((m.get("memory_gb") or 0) for m in later) if later else None,
           "last_loss": steps[-1]["loss"] if steps else None, "source": str(path)}
out.write_text(json.dumps(summary, indent=1) + "\n")
print("pretrain summary:", json.dumps(summary))
PY

# --- 3. throughput: megamobi vs Hugging Face ----------------------------------------------------------
bench() {  # bench NAME ARGS...
  local name=$1; shift
  step "bench $name" 240 "$PYTHON" bench/throughput.py --config $CONFIG --seq $SEQ --steps $STEPS --warmup $WARMUP \
    $PEAK "${BENCH_EXTRA[@]}" --json "$@" > "$WORK/bench.json" 2>> "$WORK/bench.err"
  if [ -s "$WORK/bench.json" ]; then
    tail -n 1 "$WORK/bench.json" >> "$OUT_DIR/throughput.jsonl"
    "$PYTHON" -c "import json, sys; sys.path.insert(0, 'bench'); import throughput as t; \
print(t.table(json.loads(open('$WORK/bench.json').read().splitlines()[-1])))" >> "$OUT_DIR/throughput.txt"
  fi
  : > "$WORK/bench.json"
}
: > "$OUT_DIR/throughput.jsonl"; : > "$OUT_DIR/throughput.txt"
MBS=($MICRO_BATCHES)
MB=${MBS[1]:-${MBS[0]}}  # the options at the middle micro batch
bench "micro-batch $MB" --micro-batch "$MB"

# --- 4. fused paths against the plain path -------------------------------------------------------------
# Two processes: the GPU tests initialise CUDA in pytest's own process, the Trainer tests start ranks
# (spawned where CUDA is usable: tests/multiproc.py). PYTORCH_NVML_BASED_CUDA_CHECK: asking whether
# CUDA is there (liger's and DeepSpeed's import-time probes) then does not initialise it. No pytest
# plugins: the machine's own (xdist, cov, benchmark, ...) were installed for its pytest, not ours.
export PYTORCH_NVML_BASED_CUDA_CHECK=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
step tests-gpu 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_gpu_kernels.py \
  tests/kernels/test_optimizer_kernels.py tests/kernels/test_chunked_loss.py tests/kernels/test_liger_interpreter.py \
  > "$OUT_DIR/tests.txt" 2>&1
step tests-trainer 180 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_kernel_plan.py \
  tests/test_multiproc_harness.py >> "$OUT_DIR/tests.txt" 2>&1
unset PYTORCH_NVML_BASED_CUDA_CHECK PYTEST_DISABLE_PLUGIN_AUTOLOAD
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/tests.txt" | tail -n 12 | tee -a "$LOG"

# --- 5. throughput: the Trainer vs the plain step, then the other options (compile, the slowest, last) ----
bench "trainer" --micro-batch "$MB" --trainer
bench "kernels plain" --micro-batch "$MB" --kernels plain
for mb in $MICRO_BATCHES; do
  if [ "$mb" != "$MB" ]; then bench "micro-batch $mb" --micro-batch "$mb"; fi
done
bench "selective checkpointing" --micro-batch "$MB" --activation-checkpointing selective
bench "compile" --micro-batch "$MB" --compile
tail -n 40 "$WORK/bench.err" >> "$LOG" 2>/dev/null  # the last benchmark messages (warnings, a failure's traceback)

skipped=${SKIPPED[*]:-}
if [ ${#FAILED[@]} -gt 0 ]; then
  say "FAILED: ${FAILED[*]}${skipped:+; skipped for time: $skipped}"
  say "figures and logs: $OUT_DIR"
  exit 1
fi
say "every step that ran passed${skipped:+; skipped for time: $skipped}; figures and logs: $OUT_DIR"
