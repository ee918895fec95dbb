#!/usr/bin/env bash
# Sweep MuE's image / text / decoder thresholds of a VQA (vqa_gen) checkpoint on one split (default
# val), all-candidate inference, loading it once (mue_fairseq.cli.sweep, one process: on a GPU when
# nvidia-smi lists one, else the CPU). Writes <split>_sweep.csv and <split>_sweep_pareto.png to
# result_path and, with calibrate=1, <split>_calibration.json: the fastest setting (measured) that
# keeps target x full-depth VQA accuracy, and the evaluate command that applies it (also printed);
# pass the JSON to evaluate_vqa_mue.sh as calibration=... .
#
#   bash run_scripts/vqa/sweep_vqa_mue.sh val
#   search=coordinate image_thresholds=1,0.9,0.8,0.7 bash run_scripts/vqa/sweep_vqa_mue.sh val
#
# Every variable below can be set from the environment, and so can the grid and search (image_thresholds,
# text_thresholds, decoder_thresholds, search, target, repeats, warmup_batches, calibrate: mue_sweep in
# ../mue_common.sh has their defaults). DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# val (calibrate here) or test
split=${1:-${split:-val}}

data_dir=${data_dir:-${repo}/dataset/vqa_data}
data=${data:-${data_dir}/vqa_${split}.tsv}
ans2label_file=${ans2label_file:-${data_dir}/trainval_ans2label.pkl}
path=${path:-${repo}/checkpoints/vqa_base_mue_best.pt}
result_path=${result_path:-${repo}/results/vqa_mue_sweep}
selected_cols=${selected_cols:-0,5,2,3,4}
batch_size=${batch_size:-8}
valid_batch_size=${valid_batch_size:-20}

task=vqa_gen
gen_subset=${split}
more_overrides=",\"ans2label_file\":\"${ans2label_file}\",\"valid_batch_size\":${valid_batch_size}"
mue_sweep
