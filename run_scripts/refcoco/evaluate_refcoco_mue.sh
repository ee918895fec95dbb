#!/usr/bin/env bash
# Evaluate a visual-grounding (refcoco) checkpoint with MuE exits: Acc@0.5 (IoU >= 0.5 of the
# decoded box), exit statistics per location token, expected and measured time
# (mue_fairseq.cli.evaluate, one process: on a GPU when nvidia-smi lists one, else the CPU), with
# OFA's evaluation arguments (evaluate_refcoco_base.sh: beam 5, exactly four location tokens,
# no repeated trigrams).
#
#   bash run_scripts/refcoco/evaluate_refcoco_mue.sh testA
#   dataset=refcocog bash run_scripts/refcoco/evaluate_refcoco_mue.sh test
#   calibration=results/refcoco_mue_sweep/refcoco_val_calibration.json bash run_scripts/refcoco/evaluate_refcoco_mue.sh testB
#
# dataset: refcoco / refcocoplus (splits val, testA, testB) or refcocog (val, test).
# Thresholds: img_thres / txt_thres / decoder_thres, or those of a sweep's calibration JSON
# (calibration=...); 1 disables a stream's exits. Nobody has published MuE thresholds for grounding:
# the defaults (1) evaluate at full depth; calibrate them with sweep_refcoco_mue.sh. MuE timed with
# batch_size=1 on one GPU.
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

user_dir=${user_dir:-${repo}/mue_fairseq}
bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}

dataset=${dataset:-refcoco}
split=${1:-${split:-val}}

data_dir=${data_dir:-${repo}/dataset/${dataset}_data}
data=${data:-${data_dir}/${dataset}_${split}.tsv}
path=${path:-${repo}/checkpoints/${dataset}_base_mue_best.pt}
result_path=${result_path:-${repo}/results/${dataset}_mue}
selected_cols=${selected_cols:-0,4,2,3}
batch_size=${batch_size:-16}
beam=${beam:-5}

img_thres=${img_thres:-1}
txt_thres=${txt_thres:-1}
decoder_thres=${decoder_thres:-1}
calibration=${calibration:-}
if [ -n "${calibration}" ]; then
  read -r img_thres txt_thres decoder_thres < <("${PYTHON}" -c '
import json, sys
t = json.load(open(sys.argv[1]))["thresholds"]
print(t["mue_image_threshold"], t["mue_text_threshold"], t["mue_decoder_threshold"])' "${calibration}")
fi
split_words extra "${mue_args:-}"

run "${PYTHON}" -m mue_fairseq.cli.evaluate \
    "${data}" \
    --path="${path}" \
    --user-dir="${user_dir}" \
    --task=refcoco \
    --batch-size="${batch_size}" \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset="${dataset}_${split}" \
    --results-path="${result_path}" \
    --beam="${beam}" \
    --min-len=4 \
    --max-len-a=0 \
    --max-len-b=4 \
    --no-repeat-ngram-size=3 \
    ${eval_fp16_args[@]+"${eval_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    --mue-image-threshold="${img_thres}" \
    --mue-text-threshold="${txt_thres}" \
    --mue-decoder-threshold="${decoder_thres}" \
    ${extra[@]+"${extra[@]}"} \
    --model-overrides="{\"data\":\"${data}\",\"bpe_dir\":\"${bpe_dir}\",\"selected_cols\":\"${selected_cols}\"}"
