#!/usr/bin/env bash
# Sweep MuE's image / text / decoder thresholds of a SNLI-VE checkpoint on one split (default dev),
# loading it once (mue_fairseq.cli.sweep, one process: on a GPU when nvidia-smi lists one, else
# the CPU). Writes <split>_sweep.csv and <split>_sweep_pareto.png to result_path and, with
# calibrate=1, <split>_calibration.json: the fastest setting (measured) that keeps
# target x full-depth accuracy, and the evaluate command that applies it (also printed); pass
# the JSON to evaluate_snli_ve_mue.sh as calibration=... to evaluate it on test.
#
#   bash run_scripts/snli_ve/sweep_snli_ve_mue.sh dev
#   search=coordinate image_thresholds=1,0.9,0.8,0.7 bash run_scripts/snli_ve/sweep_snli_ve_mue.sh dev
#
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

user_dir=${user_dir:-${repo}/mue_fairseq}
bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}

# dev (calibrate here) or test
split=${1:-${split:-dev}}

data_dir=${data_dir:-${repo}/dataset/snli_ve_data}
data=${data:-${data_dir}/snli_ve_${split}.tsv}
path=${path:-${repo}/checkpoints/snli_ve_base_mue_best.pt}
result_path=${result_path:-${repo}/results/snli_ve_mue_sweep}
selected_cols=${selected_cols:-0,2,3,4,5}
batch_size=${batch_size:-8}

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
    --task=snli_ve \
    --batch-size="${batch_size}" \
    --log-format=simple --log-interval=10 \
    --seed=7 \
    --gen-subset="${split}" \
    --results-path="${result_path}" \
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
