#!/usr/bin/env bash
# Train a tiny SNLI-VE checkpoint with OFA's own train.py (in OFA's environment, CPU, one thread)
# on the built-in synthetic task, for the harness's SNLI-VE comparison on a model that has learnt
# something. Flags follow OFA's run_scripts/snli_ve/train_snli_ve.sh; sizes are cut down (d=64,
# 2+2 layers, 64 px), no restore file, no validation.
#
#   tools/ofa_harness/train_ofa_snli_ve.sh [OUT_DIR]   # default work_dirs/ofa_harness/ofa_snli_ve
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/work_dirs/ofa_harness/ofa_snli_ve}" && cd "${1:-$ROOT/work_dirs/ofa_harness/ofa_snli_ve}" && pwd)
PEER=${OFA_PEER_DIR:-$ROOT/work_dirs/ofa_peer}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3  # no venv in this checkout: the python on PATH
UPDATES=${UPDATES:-600}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NLTK_DATA=$PEER/nltk_data
[ -f "$OUT/data/snli_ve_test.tsv" ] || (cd "$ROOT" && PYTHONPATH=$ROOT "$PY" -m data_utils.synthetic_task \
    --out "$OUT/data" --seed 21 --num-train 400 --num-valid 4 --num-test 12 --image-size 64)
cd "$PEER/src/run_scripts/snli_ve"
"$PEER/venv/bin/python" ../../train.py "$OUT/data/snli_ve_train.tsv,$OUT/data/snli_ve_valid.tsv" \
    --selected-cols=0,2,3,4,5 --bpe-dir=../../utils/BPE --user-dir=../../ofa_module \
    --save-dir="$OUT/checkpoints" --task=snli_ve --arch=ofa_tiny \
    --encoder-embed-dim=64 --encoder-ffn-embed-dim=128 --encoder-layers=2 --decoder-layers=2 \
    --encoder-attention-heads=2 --decoder-attention-heads=2 --resnet-type=resnet18 \
    --criterion=adjust_label_smoothed_cross_entropy --label-smoothing=0.0 --batch-size=16 \
    --encoder-normalize-before --decoder-normalize-before --share-decoder-input-output-embed \
    --share-all-embeddings --layernorm-embedding --patch-layernorm-embedding --code-layernorm-embedding \
    --dropout=0.0 --attention-dropout=0.0 --weight-decay=0.01 --optimizer=adam --adam-betas="(0.9,0.999)" \
    --adam-eps=1e-08 --clip-norm=1.0 --lr-scheduler=polynomial_decay --lr=1e-3 --max-update="$UPDATES" \
    --total-num-update="$UPDATES" --warmup-updates=30 --log-format=simple --log-interval=50 \
    --disable-validation --no-epoch-checkpoints --save-interval-updates=0 --save-interval=1000 --no-save-optimizer-state \
    --max-src-length=80 --max-tgt-length=20 --add-type-embedding --scale-attn --scale-fc --scale-heads \
    --disable-entangle --num-bins=1000 --patch-image-size=64 --image-bucket-size=8 --token-bucket-size=32 \
    --prompt-type=prev_output --add-caption --fixed-validation-seed=7 --cpu --num-workers=0 --seed=1
ls -la "$OUT/checkpoints"
