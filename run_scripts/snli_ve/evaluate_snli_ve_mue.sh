#!/usr/bin/env bash
# Evaluate a SNLI-VE checkpoint with MuE exits: accuracy, exit statistics, expected and measured
# time (mue_fairseq.cli.evaluate, one process: on a GPU when nvidia-smi lists one, else the CPU).
#
#   bash run_scripts/snli_ve/evaluate_snli_ve_mue.sh test
#   calibration=results/snli_ve_mue_sweep/dev_calibration.json bash run_scripts/snli_ve/evaluate_snli_ve_mue.sh test
#
# The first argument is the split (dev or test). Thresholds: img_thres / txt_thres / decoder_thres
# (defaults: the authors' released SNLI-VE setting), or those of a sweep's calibration JSON
# (calibration=...); 1 disables a stream's exits. MuE timed with batch_size=1 on one GPU.
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy --snli-mode generate").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# dev or test
split=${1:-${split:-test}}

data_dir=${data_dir:-${repo}/dataset/snli_ve_data}
data=${data:-${data_dir}/snli_ve_${split}.tsv}
path=${path:-${repo}/checkpoints/snli_ve_base_mue_best.pt}
result_path=${result_path:-${repo}/results/snli_ve_mue}
selected_cols=${selected_cols:-0,2,3,4,5}
batch_size=${batch_size:-8}

img_thres=${img_thres:-0.7}
txt_thres=${txt_thres:-0.99}
decoder_thres=${decoder_thres:-0.7}

task=snli_ve
gen_subset=${split}
mue_evaluate_with_exits
