#!/usr/bin/env bash
# Evaluate a caption checkpoint with MuE exits: CIDEr-D (and, with official_caption_scores=1,
# pycocoevalcap's BLEU/METEOR/ROUGE-L/CIDEr as OFA's coco_eval.py), exit statistics, expected and
# measured time (mue_fairseq.cli.evaluate, one process: on a GPU when nvidia-smi lists one, else
# the CPU).
#
#   bash run_scripts/caption/evaluate_caption_mue.sh
#   calibration=results/caption_mue_sweep/val_calibration.json bash run_scripts/caption/evaluate_caption_mue.sh
#
# Thresholds: img_thres / txt_thres / decoder_thres (defaults: the authors' released caption
# setting), or those of a sweep's calibration JSON (calibration=...); 1 disables a stream's exits.
# MuE timed with batch_size=1 on one GPU.
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy --mue-decoder-beta 0.9").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

user_dir=${user_dir:-${repo}/mue_fairseq}
bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}

split=${1:-${split:-test}}

data_dir=${data_dir:-${repo}/dataset/caption_data}
data=${data:-${data_dir}/caption_${split}.tsv}
path=${path:-${repo}/checkpoints/caption_base_mue_best.pt}
result_path=${result_path:-${repo}/results/caption_mue}
selected_cols=${selected_cols:-1,4,2}
batch_size=${batch_size:-16}
beam=${beam:-5}
max_len_b=${max_len_b:-16}
no_repeat_ngram_size=${no_repeat_ngram_size:-3}
official_caption_scores=${official_caption_scores:-1}

img_thres=${img_thres:-0.99}
txt_thres=${txt_thres:-0.7}
decoder_thres=${decoder_thres:-0.9}
calibration=${calibration:-}
if [ -n "${calibration}" ]; then
  read -r img_thres txt_thres decoder_thres < <("${PYTHON}" -c '
import json, sys
t = json.load(open(sys.argv[1]))["thresholds"]
print(t["mue_image_threshold"], t["mue_text_threshold"], t["mue_decoder_threshold"])' "${calibration}")
fi
score_args=()
if [ "${official_caption_scores}" = "1" ]; then
  score_args=(--official-caption-scores)
fi
split_words extra "${mue_args:-}"

run "${PYTHON}" -m mue_fairseq.cli.evaluate \
    "${data}" \
    --path="${path}" \
    --user-dir="${user_dir}" \
    --task=caption \
    --batch-size="${batch_size}" \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset="${split}" \
    --results-path="${result_path}" \
    --beam="${beam}" \
    --max-len-b="${max_len_b}" \
    --no-repeat-ngram-size="${no_repeat_ngram_size}" \
    ${eval_fp16_args[@]+"${eval_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    --mue-image-threshold="${img_thres}" \
    --mue-text-threshold="${txt_thres}" \
    --mue-decoder-threshold="${decoder_thres}" \
    ${score_args[@]+"${score_args[@]}"} \
    ${extra[@]+"${extra[@]}"} \
    --model-overrides="{\"data\":\"${data}\",\"bpe_dir\":\"${bpe_dir}\",\"eval_cider\":False,\"selected_cols\":\"${selected_cols}\"}"
