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
# Every variable below can be set from the environment, and so can the grid and search (image_thresholds,
# text_thresholds, decoder_thresholds, search, target, repeats, warmup_batches, calibrate: mue_sweep in
# ../mue_common.sh has their defaults). DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# dev (calibrate here) or test
split=${1:-${split:-dev}}

data_dir=${data_dir:-${repo}/dataset/snli_ve_data}
data=${data:-${data_dir}/snli_ve_${split}.tsv}
path=${path:-${repo}/checkpoints/snli_ve_base_mue_best.pt}
result_path=${result_path:-${repo}/results/snli_ve_mue_sweep}
selected_cols=${selected_cols:-0,2,3,4,5}
batch_size=${batch_size:-8}

task=snli_ve
gen_subset=${split}
mue_sweep
