#!/usr/bin/env bash
# Sweep MuE's image / text / decoder thresholds of a caption checkpoint on one split (default val),
# loading it once (mue_fairseq.cli.sweep, one process: on a GPU when nvidia-smi lists one, else
# the CPU). Quality is CIDEr-D. Writes <split>_sweep.csv and <split>_sweep_pareto.png to
# result_path and, with calibrate=1, <split>_calibration.json: the fastest setting (measured) that
# keeps target x full-depth CIDEr-D, and the evaluate command that applies it (also printed); pass
# the JSON to evaluate_caption_mue.sh as calibration=... to evaluate it on test.
#
#   bash run_scripts/caption/sweep_caption_mue.sh val
#   search=coordinate decoder_thresholds=1,0.95,0.9,0.8 bash run_scripts/caption/sweep_caption_mue.sh val
#
# Every variable below can be set from the environment, and so can the grid and search (image_thresholds,
# text_thresholds, decoder_thresholds, search, target, repeats, warmup_batches, calibrate: mue_sweep in
# ../mue_common.sh has their defaults). DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# val (calibrate here) or test
split=${1:-${split:-val}}

data_dir=${data_dir:-${repo}/dataset/caption_data}
data=${data:-${data_dir}/caption_${split}.tsv}
path=${path:-${repo}/checkpoints/caption_base_mue_best.pt}
result_path=${result_path:-${repo}/results/caption_mue_sweep}
selected_cols=${selected_cols:-1,4,2}
batch_size=${batch_size:-16}
beam=${beam:-5}
max_len_b=${max_len_b:-16}
no_repeat_ngram_size=${no_repeat_ngram_size:-3}

task=caption
gen_subset=${split}
more_overrides=",\"eval_cider\":False"
mue_sweep --beam="${beam}" --max-len-b="${max_len_b}" --no-repeat-ngram-size="${no_repeat_ngram_size}"
