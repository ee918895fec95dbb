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
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy --mue-decoder-beta 0.9").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

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
score_args=()
if [ "${official_caption_scores}" = "1" ]; then
  score_args=(--official-caption-scores)
fi

task=caption
gen_subset=${split}
more_overrides=",\"eval_cider\":False"
mue_evaluate_with_exits --beam="${beam}" --max-len-b="${max_len_b}" --no-repeat-ngram-size="${no_repeat_ngram_size}" \
    ${score_args[@]+"${score_args[@]}"}
