#!/usr/bin/env bash
# Sweep MuE's image / text / decoder thresholds of a visual-grounding (refcoco) checkpoint on one
# split (default val), loading it once (mue_fairseq.cli.sweep, one process: on a GPU when
# nvidia-smi lists one, else the CPU), boxes generated with OFA's evaluation arguments (beam 5,
# four location tokens). Writes <dataset>_<split>_sweep.csv and _sweep_pareto.png to result_path
# and, with calibrate=1, <dataset>_<split>_calibration.json: the fastest setting (measured) that
# keeps target x full-depth Acc@0.5, and the evaluate command that applies it (also printed); pass
# the JSON to evaluate_refcoco_mue.sh as calibration=... .
#
#   bash run_scripts/refcoco/sweep_refcoco_mue.sh val
#   dataset=refcocoplus search=coordinate bash run_scripts/refcoco/sweep_refcoco_mue.sh val
#
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

user_dir=${user_dir:-${repo}/mue_fairseq}
bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}

dataset=${dataset:-refcoco}
# val (calibrate here) or a test split
split=${1:-${split:-val}}

data_dir=${data_dir:-${repo}/dataset/${dataset}_data}
data=${data:-${data_dir}/${dataset}_${split}.tsv}
path=${path:-${repo}/checkpoints/${dataset}_base_mue_best.pt}
result_path=${result_path:-${repo}/results/refcoco_mue_sweep}
selected_cols=${selected_cols:-0,4,2,3}
batch_size=${batch_size:-16}
beam=${beam:-5}

image_thresholds=${image_thresholds:-1,0.97,0.95,0.9}
text_thresholds=${text_thresholds:-1,0.97,0.95,0.9}
decoder_thresholds=${decoder_thresholds:-1,0.97,0.95,0.9}
search=${search:-grid}
target=${target:-0.99}
calibrate=${calibrate:-1}
repeats=${repeats:-1}
warmup_batches=${warmup_batches:-2}

calibrate_args=()
if [ "${calibrate}" = "1" ]; then
  calibrate_args=(--calibrate)
fi
split_words extra "${mue_args:-}"

run "${PYTHON}" -m mue_fairseq.cli.sweep \
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
    --image-thresholds="${image_thresholds}" \
    --text-thresholds="${text_thresholds}" \
    --decoder-thresholds="${decoder_thresholds}" \
    --search="${search}" \
    --target="${target}" \
    --repeats="${repeats}" \
    --warmup-batches="${warmup_batches}" \
    ${calibrate_args[@]+"${calibrate_args[@]}"} \
    ${extra[@]+"${extra[@]}"} \
    --model-overrides="{\"data\":\"${data}\",\"bpe_dir\":\"${bpe_dir}\",\"selected_cols\":\"${selected_cols}\"}"
