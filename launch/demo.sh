#!/usr/bin/env bash
# The main job on a fresh machine, CPU only, a few minutes:
#   1. set up .venv with the pinned stack;
#   2. build real English training data: the docstrings of Python's standard library -> a 4096-token
#      SentencePiece BPE -> 2049-token shards (data_tools/);
#   3. pretrain the tiny MobiLlama (shared FFN) with 2 DeepSpeed processes, ZeRO-1, 300 steps,
#      through launch/pretrain.sh, exactly as on a cluster;
#   4. show the loss falling and sample text from the final checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
DATA=runs/demo-data
RUN_DIR=runs/demo

echo "== 1/4 data: Python standard library docstrings -> tokenizer -> shards"
[ -f $DATA/stdlib_docs.jsonl ] || $PY data_tools/stdlib_docs_corpus.py --output $DATA/stdlib_docs.jsonl
[ -f $DATA/tokenizer.model ] || $PY data_tools/train_tokenizer.py --input $DATA/stdlib_docs.jsonl --output $DATA/tokenizer --vocab-size 4096
$PY data_tools/preprocess_amber.py --format text --input $DATA/stdlib_docs.jsonl --tokenizer $DATA/tokenizer.model \
  --output $DATA/shards --workers 2 --samples-per-shard 64
$PY data_tools/inspect_shards.py $DATA/shards | tail -n 4

echo "== 2/4 model"
$PY -m megamobi.model --config configs/tiny.yaml

echo "== 3/4 pretraining: 2 DeepSpeed processes, ZeRO-1, fp32"
rm -rf $RUN_DIR
NPROC_PER_NODE=2 bash launch/pretrain.sh configs/pretrain-tiny-cpu.yaml run_dir=$RUN_DIR data.paths=[$DATA/shards]

echo "== 4/4 result"
$PY - "$RUN_DIR/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
train = [r for r in rows if "loss" in r]
val = [r for r in rows if "val_loss" in r]
print(f"train loss: step {train[0]['step']} {train[0]['loss']:.3f} -> step {train[-1]['step']} {train[-1]['loss']:.3f}")
if val:
    print(f"validation loss: step {val[0]['step']} {val[0]['val_loss']:.3f} -> step {val[-1]['step']} {val[-1]['val_loss']:.3f}")
if not train[-1]["loss"] < train[0]["loss"] - 1.0:
    sys.exit("the loss did not fall by at least 1.0: something is wrong")
PYEOF
CKPT=$RUN_DIR/checkpoints/$(cat $RUN_DIR/checkpoints/latest)
echo "sample from $CKPT:"
$PY -m megamobi.generate --checkpoint "$CKPT" --tokenizer $DATA/tokenizer.model --prompt "Return the" --max-new-tokens 40
echo "plots of the run:"
$PY -m megamobi.plot $RUN_DIR --output $RUN_DIR/plots
echo "done: metrics in $RUN_DIR/metrics.jsonl, checkpoints in $RUN_DIR/checkpoints"
