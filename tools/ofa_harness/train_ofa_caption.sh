#!/usr/bin/env bash
# Train a small caption checkpoint with OFA's own train.py (in OFA's environment, CPU, one thread)
# on the built-in synthetic task: the start of the user's journey (benchmarks/bench_journey.py), a
# checkpoint that OFA made and that was never trained with the layer-wise loss. Flags follow OFA's
# run_scripts/caption/train_caption_stage1_base.sh; sizes are cut down (arch ofa_tiny with d=128,
# 4+4 layers, resnet18, 64 px), no restore file (trained from scratch), no validation, no
# dropout, no drop-worst (too few updates for either to matter).
#
#   tools/ofa_harness/train_ofa_caption.sh [OUT_DIR]   # default work_dirs/ofa_harness/ofa_caption
#
# Writes OUT_DIR/data/ (the synthetic task: 2,000 train, 100 valid, 100 test images, seed 31) and
# OUT_DIR/checkpoints/checkpoint_last.pt. UPDATES (default 400) sets the training length.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/work_dirs/ofa_harness/ofa_caption}" && cd "${1:-$ROOT/work_dirs/ofa_harness/ofa_caption}" && pwd)
PEER=${OFA_PEER_DIR:-$ROOT/work_dirs/ofa_peer}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3  # no venv in this checkout: the python on PATH
UPDATES=${UPDATES:-400}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 NLTK_DATA=$PEER/nltk_data
[ -f "$OUT/data/caption_test.tsv" ] || (cd "$ROOT" && PYTHONPATH=$ROOT "$PY" -m data_utils.synthetic_task \
    --out "$OUT/data" --seed 31 --num-train 2000 --num-valid 100 --num-test 100 --image-size 64)
cd "$PEER/src/run_scripts/caption"
"$PEER/venv/bin/python" ../../train.py "$OUT/data/caption_train.tsv,$OUT/data/caption_valid.tsv" \
    --selected-cols=0,4,2 --bpe-dir=../../utils/BPE --user-dir=../../ofa_module \
    --save-dir="$OUT/checkpoints" --task=caption --arch=ofa_tiny \
    --encoder-embed-dim=128 --encoder-ffn-embed-dim=256 --encoder-layers=4 --decoder-layers=4 \
    --encoder-attention-heads=4 --decoder-attention-heads=4 --resnet-type=resnet18 \
    --criterion=adjust_label_smoothed_cross_entropy --label-smoothing=0.1 --batch-size=16 --update-freq=1 \
    --encoder-normalize-before --decoder-normalize-before --share-decoder-input-output-embed \
    --share-all-embeddings --layernorm-embedding --patch-layernorm-embedding --code-layernorm-embedding \
    --resnet-drop-path-rate=0.0 --encoder-drop-path-rate=0.0 --decoder-drop-path-rate=0.0 \
    --dropout=0.0 --attention-dropout=0.0 --weight-decay=0.01 --optimizer=adam --adam-betas="(0.9,0.999)" \
    --adam-eps=1e-08 --clip-norm=1.0 --lr-scheduler=polynomial_decay --lr=1e-3 --max-update="$UPDATES" \
    --total-num-update="$UPDATES" --warmup-updates=$((UPDATES / 10)) --log-format=simple --log-interval=50 \
    --disable-validation --no-epoch-checkpoints --save-interval-updates=0 --save-interval=1000 --no-save-optimizer-state \
    --max-src-length=80 --max-tgt-length=20 --add-type-embedding --scale-attn --scale-fc --scale-heads \
    --disable-entangle --num-bins=1000 --patch-image-size=64 --image-bucket-size=8 --token-bucket-size=32 \
    --fixed-validation-seed=7 --cpu --num-workers=0 --seed=1
ls -la "$OUT/checkpoints"
