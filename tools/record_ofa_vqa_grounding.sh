#!/usr/bin/env bash
# Record OFA's own refcoco and vqa_gen behaviour on the built-in synthetic data, for parity tests
# (tests/test_ofa_parity_vqa_grounding.py; the small fixtures are in tests/fixtures/ofa_vqa_grounding/).
#
#   NLTK_DATA=PEER/nltk_data tools/record_ofa_vqa_grounding.sh OFA_PYTHON [OUT_DIR]
#
# OFA_PYTHON: the Python 3.8 of OFA's environment (torch 1.8.1, OFA's fairseq fork installed; PEER is
# work_dirs/ofa_peer of tools/ofa_harness/setup_ofa_env.sh). OUR python (.venv) makes the data and the
# exact start (tools/ofa_harness/interop_checkpoint.py). OUT_DIR (default work_dirs/ofa_parity) receives:
#   src/        OFA's tree at a36b91ce (train.py, evaluate.py, models, tasks, ...), with two patches that
#               do not touch the model: evaluate.py's score accumulators stay on the CPU without CUDA, and
#               the criterion masks constraint logits in place (it assigns into a tuple: a TypeError)
#   data/       refcoco_*.tsv, vqa_gen_*.tsv, vqa_ans2label.pkl (data_utils.synthetic_vqa_grounding)
#   refcoco/    base/ (one update of OFA's train.py: the model's shape), init.pt (that checkpoint with its
#               token embeddings and ResNet convolutions set to exact values: interop_checkpoint.py init),
#               checkpoint_last.pt written by OFA's train.py from init.pt with those tensors frozen
#               (ofa_tiny cut down to d=32, 2+2 layers; $UPDATES updates, default 300, on $NUM_TRAIN
#               training images, default 32; tools/ofa_train_frozen_resnet.py freezes the convolutions,
#               which OFA has no option for), and OFA's evaluate.py outputs on refcoco_test.tsv:
#               test_predict.json, evaluate.log and outputs.json (every beam hypothesis)
#   vqa_gen/    the same for vqa_gen: evaluate_allcand/ and evaluate_beam/ (--beam-search-vqa-eval)
#   fixtures/ofa_vqa_grounding/  what to commit as tests/fixtures/ofa_vqa_grounding/: the checkpoints
#               stripped of the frozen tensors (interop_checkpoint.py strip; `rebuild` restores them)
set -euo pipefail
OFA_PY=${1:?usage: $0 OFA_PYTHON [OUT_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${2:-$ROOT/work_dirs/ofa_parity}" && cd "${2:-$ROOT/work_dirs/ofa_parity}" && pwd)
OFA_GIT=${OFA_GIT_DIR:-/work/.mirror/OFA-Sys+OFA/repo}
OFA_COMMIT=a36b91ce86ff105ac8d9e513aa88f42b85e33479
OBSERVE=${OFA_OBSERVE:-$ROOT/tools/ofa_observe_generation.py}
FROZEN_TRAIN=$ROOT/tools/ofa_train_frozen_resnet.py
INTEROP=$ROOT/tools/ofa_harness/interop_checkpoint.py
BPE_DIR=${MUE_BPE_DIR:-$ROOT/../shared/ofa_bpe}
OUR_PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$OUR_PY" ] || OUR_PY=python3  # no venv in this checkout: the python on PATH
# OFA imports g2p_en (speech tasks) at start-up, which needs NLTK's cmudict: set NLTK_DATA to a folder holding it.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONDONTWRITEBYTECODE=1

if [ ! -f "$OUT/src/train.py" ]; then
    mkdir -p "$OUT/src"
    git --git-dir="$OFA_GIT" archive "$OFA_COMMIT" train.py evaluate.py trainer.py criterions data models tasks \
        utils ofa_module run_scripts/refcoco run_scripts/vqa | tar -x -C "$OUT/src"
    sed -i 's/^\(\s*score_\(sum\|cnt\) = torch.FloatTensor(\[0\])\)\.cuda()$/\1.cuda() if use_cuda else torch.FloatTensor([0])/' \
        "$OUT/src/evaluate.py"
    sed -i 's/            net_output\[0\] = net_output\[0\].masked_fill(~constraint_masks, -math.inf)/            net_output[0].masked_fill_(~constraint_masks, -math.inf)/' \
        "$OUT/src/criterions/label_smoothed_cross_entropy.py"
    [ "$(grep -c 'cuda() if use_cuda else' "$OUT/src/evaluate.py")" = 2 ] || { echo "evaluate.py patch failed" >&2; exit 2; }
    grep -q 'net_output\[0\].masked_fill_(~constraint_masks' "$OUT/src/criterions/label_smoothed_cross_entropy.py" \
        || { echo "criterion patch failed" >&2; exit 2; }
fi
[ -f "$OUT/data/vqa_ans2label.pkl" ] || (cd "$ROOT" && PYTHONPATH=$ROOT "$OUR_PY" -m data_utils.synthetic_vqa_grounding \
    --out-dir "$OUT/data" --seed 7 --num-train "${NUM_TRAIN:-32}" --num-valid 4 --num-test 6 >/dev/null)

MODEL=(--arch=ofa_tiny --encoder-embed-dim=32 --decoder-embed-dim=32 --encoder-ffn-embed-dim=64
       --decoder-ffn-embed-dim=64 --encoder-layers=2 --decoder-layers=2 --encoder-attention-heads=2
       --decoder-attention-heads=2 --resnet-type=resnet18 --patch-image-size=64 --token-bucket-size=32
       --image-bucket-size=8 --encoder-normalize-before --decoder-normalize-before --share-decoder-input-output-embed
       --share-all-embeddings --layernorm-embedding --patch-layernorm-embedding --code-layernorm-embedding
       --add-type-embedding --scale-attn --scale-fc --scale-heads --disable-entangle --dropout=0.1
       --attention-dropout=0.0)
TRAIN=(--bpe-dir="$BPE_DIR" --user-dir=../../ofa_module --criterion=adjust_label_smoothed_cross_entropy
       --label-smoothing=0.1 --optimizer=adam --adam-betas="(0.9,0.999)" --lr=3e-3 --max-update="${UPDATES:-300}" --batch-size=8
       --cpu --num-workers=0 --seed=1 --log-format=simple --log-interval=1 --disable-validation
       --no-epoch-checkpoints --no-save-optimizer-state --max-src-length=40 --max-tgt-length=10 --num-bins=1000)
# The large tensors stay at the exact values of init.pt, so the fixtures hold only what training changed.
FROZEN=(--freeze-encoder-embedding --freeze-decoder-embedding --reset-optimizer --reset-dataloader --reset-meters
        --reset-lr-scheduler)

# train TASK_DIR DATA ARGS...: base (1 update) -> init.pt (exact large tensors) -> checkpoint_last.pt
train() {
    local dir=$1 data=$2; shift 2
    [ -f "$dir/checkpoint_last.pt" ] && return 0
    mkdir -p "$dir/base"
    "$OFA_PY" ../../train.py "$data" "$@" "${MODEL[@]}" "${TRAIN[@]}" --max-update=1 --save-dir="$dir/base" \
        > "$dir/base/train.log" 2>&1 || { tail -30 "$dir/base/train.log"; exit 1; }
    (cd "$ROOT" && PYTHONPATH=$ROOT "$OUR_PY" "$INTEROP" init "$dir/base/checkpoint_last.pt" "$dir/init.pt")
    "$OFA_PY" "$FROZEN_TRAIN" -- "$data" "$@" "${MODEL[@]}" "${TRAIN[@]}" "${FROZEN[@]}" --restore-file="$dir/init.pt" \
        --save-dir="$dir" > "$dir/train.log" 2>&1 || { tail -30 "$dir/train.log"; exit 1; }
}
EVAL=(--user-dir=../../ofa_module --batch-size=4 --log-format=simple --log-interval=1 --seed=7 --cpu
      --num-workers=0 --required-batch-size-multiple=1)

# ---- refcoco
cd "$OUT/src/run_scripts/refcoco"
train "$OUT/refcoco" "$OUT/data/refcoco_train.tsv,$OUT/data/refcoco_valid.tsv" --task=refcoco \
    --selected-cols=0,4,2,3 --max-image-size=64
mkdir -p "$OUT/refcoco/evaluate"
# --batch-size=1: at this commit evaluate.py tests `if scores and ...` on refcoco's score tensor, which
# raises for a batch of more than one row ("Boolean value of Tensor with more than one value is ambiguous").
"$OFA_PY" "$OBSERVE" --record "$OUT/refcoco/evaluate/outputs.json" -- "$OUT/data/refcoco_test.tsv" \
    --path="$OUT/refcoco/checkpoint_last.pt" --task=refcoco --gen-subset=test "${EVAL[@]}" --batch-size=1 \
    --results-path="$OUT/refcoco/evaluate" --beam=5 --min-len=4 --max-len-a=0 --max-len-b=4 --no-repeat-ngram-size=3 \
    --model-overrides="{\"data\":\"$OUT/data/refcoco_test.tsv\",\"bpe_dir\":\"$BPE_DIR\",\"selected_cols\":\"0,4,2,3\"}" \
    > "$OUT/refcoco/evaluate/evaluate.log" 2>&1 || { tail -30 "$OUT/refcoco/evaluate/evaluate.log"; exit 1; }

# ---- vqa_gen
cd "$OUT/src/run_scripts/vqa"
train "$OUT/vqa_gen" "$OUT/data/vqa_gen_train.tsv,$OUT/data/vqa_gen_valid.tsv" --task=vqa_gen \
    --selected-cols=0,5,2,3,4 --ans2label-file="$OUT/data/vqa_ans2label.pkl" --prompt-type=prev_output \
    --add-object --valid-batch-size=7 --val-inference-type=allcand
for mode in allcand beam; do
    flag=(); [ "$mode" = beam ] && flag=(--beam-search-vqa-eval --beam=5 --unnormalized --temperature=1.0)
    mkdir -p "$OUT/vqa_gen/evaluate_$mode"
    "$OFA_PY" "$OBSERVE" --record "$OUT/vqa_gen/evaluate_$mode/outputs.json" -- "$OUT/data/vqa_gen_test.tsv" \
        --path="$OUT/vqa_gen/checkpoint_last.pt" --task=vqa_gen --gen-subset=test "${EVAL[@]}" "${flag[@]}" \
        --results-path="$OUT/vqa_gen/evaluate_$mode" \
        --model-overrides="{\"data\":\"$OUT/data/vqa_gen_test.tsv\",\"bpe_dir\":\"$BPE_DIR\",\"selected_cols\":\"0,5,2,3,4\",\"ans2label_file\":\"$OUT/data/vqa_ans2label.pkl\"}" \
        > "$OUT/vqa_gen/evaluate_$mode/evaluate.log" 2>&1 || { tail -30 "$OUT/vqa_gen/evaluate_$mode/evaluate.log"; exit 1; }
done
grep -h "score_sum" "$OUT"/*/evaluate*/evaluate.log

# ---- the fixture folder the parity tests read: copy it to tests/fixtures/ofa_vqa_grounding/. The checkpoints
# are committed without their frozen tensors; the tests rebuild them (a digest of every tensor is checked).
F="$OUT/fixtures/ofa_vqa_grounding"
mkdir -p "$F/refcoco" "$F/vqa_gen_allcand" "$F/vqa_gen_beam"
for task in refcoco vqa_gen; do
    (cd "$ROOT" && PYTHONPATH=$ROOT "$OUR_PY" "$INTEROP" strip "$OUT/$task/checkpoint_last.pt" "$F/ofa_tiny_${task}_small.pt")
done
cp "$OUT/data/refcoco_test.tsv" "$OUT/data/vqa_gen_test.tsv" "$OUT/data/vqa_ans2label.pkl" "$F/"
cp "$OUT/refcoco/evaluate/"{test_predict.json,outputs.json,evaluate.log} "$F/refcoco/"
for mode in allcand beam; do cp "$OUT/vqa_gen/evaluate_$mode/"{test_predict.json,outputs.json,evaluate.log} "$F/vqa_gen_$mode/"; done
cat > "$F/README.md" <<README
# OFA refcoco / vqa_gen fixtures (tiny checkpoints trained by OFA's train.py, OFA's evaluate.py outputs)

Read by \`tests/test_ofa_parity_vqa_grounding.py\`. Made by \`tools/record_ofa_vqa_grounding.sh\` with
OFA-Sys/OFA at \`$OFA_COMMIT\` and its fairseq fork
($("$OFA_PY" -c 'import sys, torch; print("Python", sys.version.split()[0] + ", torch", torch.__version__)'), CPU, float32, one thread):

    NLTK_DATA=PEER/nltk_data tools/record_ofa_vqa_grounding.sh PEER/venv/bin/python   # PEER: work_dirs/ofa_peer
    cp -r work_dirs/ofa_parity/fixtures/ofa_vqa_grounding/. tests/fixtures/ofa_vqa_grounding/

Data: \`data_utils.synthetic_vqa_grounding\` (seed 7, ${NUM_TRAIN:-32} training images). Model: ofa_tiny at
d=32, 2+2 layers, resnet18, 64 px. Training: one update of OFA's train.py gives the shape; its token
embeddings and ResNet convolutions are set to exact values (\`tools/ofa_harness/interop_checkpoint.py init\`:
integers from numpy's legacy RandomState times a power of two); then ${UPDATES:-300} Adam updates of OFA's
train.py with those tensors frozen (\`--freeze-encoder-embedding --freeze-decoder-embedding\`, and
\`tools/ofa_train_frozen_resnet.py\` for the convolutions, which OFA's own \`--freeze-resnet\` leaves trainable).
Two patches to OFA's tree, none in the model: evaluate.py keeps its score accumulators on the CPU, and the
criterion masks constraint logits in place (its tuple assignment is a TypeError with constraint masks).

| file | what |
| --- | --- |
| ofa_tiny_refcoco_small.pt, ofa_tiny_vqa_gen_small.pt | the trained checkpoints less their frozen tensors; \`interop_checkpoint.py rebuild SMALL FULL\` restores the file OFA evaluated (digest checked) |
| refcoco_test.tsv, vqa_gen_test.tsv, vqa_ans2label.pkl | the evaluated rows (selected cols 0,4,2,3 / 0,5,2,3,4) and the candidate answers |
| refcoco/ | evaluate.py --beam=5 --min-len=4 --max-len-a=0 --max-len-b=4 --no-repeat-ngram-size=3 --batch-size=1 |
| vqa_gen_allcand/, vqa_gen_beam/ | evaluate.py --batch-size=4, all-candidate scoring / --beam-search-vqa-eval --beam=5 --unnormalized |
| */test_predict.json, */evaluate.log | OFA's result file and log (score line) |
| */outputs.json | observed (tools/ofa_observe_generation.py): every beam hypothesis (tokens, score, positional scores) and the vqa candidate score matrix |

refcoco runs at batch size 1: at this commit evaluate.py tests \`if scores and ...\` on refcoco's score tensor,
which raises for a batch of more than one row.
README
(cd "$F" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
echo "fixtures in $F"
