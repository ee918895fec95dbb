#!/usr/bin/env bash
# Train the two tiny caption checkpoints of the interop check with our fairseq-train
# (`--user-dir mue_fairseq`) on the built-in synthetic task: `ofa` (arch ofa_tiny, OFA's label-
# smoothed loss) and `mue_ofa` (arch mue_ofa_tiny, the layer-wise loss). Widths and layer counts are
# cut down (d=32, 2+2 layers); one thread, fixed seeds.
#
#   tools/ofa_harness/train_interop.sh [OUT_DIR]   # default work_dirs/ofa_harness/interop
#
# Writes OUT_DIR/data/ (synthetic TSVs), OUT_DIR/{ofa,mue_ofa}/checkpoint_last.pt and the small
# OUT_DIR/{ofa,mue_ofa}_small.pt to commit (interop_checkpoint.py rebuilds the full files from them).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$ROOT/work_dirs/ofa_harness/interop}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3  # no venv in this checkout: the python on PATH
BPE_DIR=${MUE_BPE_DIR:-$ROOT/../shared/ofa_bpe}
UPDATES=${UPDATES:-300}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=$ROOT
cd "$ROOT"
[ -f "$OUT/data/caption_test.tsv" ] || "$PY" -m data_utils.synthetic_task --out "$OUT/data" --seed 11 \
    --num-train 48 --num-valid 4 --num-test 12 --image-size 64
MODEL=(--encoder-embed-dim 32 --encoder-ffn-embed-dim 64 --encoder-layers 2 --decoder-layers 2
       --encoder-attention-heads 2 --decoder-attention-heads 2 --resnet-type resnet18 --patch-image-size 64
       --image-bucket-size 8 --token-bucket-size 32)
TASK=(--task caption --bpe-dir "$BPE_DIR" --selected-cols 0,4,2 --max-src-length 40 --max-tgt-length 16)
COMMON=(--user-dir mue_fairseq --optimizer adam --batch-size 8 --cpu --num-workers 0 --seed 1
        --log-format simple --log-interval 50 --disable-validation --no-epoch-checkpoints --no-save-optimizer-state)
train() { "$PY" -m fairseq_cli.train "$OUT/data/caption_train.tsv,$OUT/data/caption_valid.tsv" "$@"; }

# A start whose embeddings and ResNet convolutions are exact (interop_checkpoint.py): one update
# of an ofa_tiny-shaped model, then those tensors replaced.
if [ ! -f "$OUT/init.pt" ]; then
    train "${TASK[@]}" --arch ofa_tiny "${MODEL[@]}" --criterion adjust_label_smoothed_cross_entropy \
        "${COMMON[@]}" --lr 1e-3 --max-update 1 --save-dir "$OUT/base"
    "$PY" tools/ofa_harness/interop_checkpoint.py init "$OUT/base/checkpoint_last.pt" "$OUT/init.pt"
fi
# Those tensors stay fixed, so the rest (about 0.6 MB) is all a test needs to rebuild the file.
FIXED=(--freeze-encoder-embedding --freeze-decoder-embedding --freeze-resnet-weights)
for variant in ofa mue_ofa; do
    if [ "$variant" = ofa ]; then arch=ofa_tiny; criterion=adjust_label_smoothed_cross_entropy
    else arch=mue_ofa_tiny; criterion=mue_layerwise_ce; fi
    [ -f "$OUT/$variant/checkpoint_last.pt" ] && continue
    train "${TASK[@]}" --arch "$arch" "${MODEL[@]}" "${FIXED[@]}" --criterion "$criterion" --label-smoothing 0.1 \
        "${COMMON[@]}" --lr 3e-3 --max-update "$UPDATES" --restore-file "$OUT/init.pt" --reset-optimizer \
        --reset-dataloader --reset-meters --save-dir "$OUT/$variant"
    "$PY" tools/ofa_harness/interop_checkpoint.py strip "$OUT/$variant/checkpoint_last.pt" "$OUT/${variant}_small.pt"
done
ls -la "$OUT"/*/checkpoint_last.pt "$OUT"/*_small.pt
