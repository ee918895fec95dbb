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
# Every variable below can be set from the environment, and so can the grid and search (image_thresholds,
# text_thresholds, decoder_thresholds, search, target, repeats, warmup_batches, calibrate: mue_sweep in
# ../mue_common.sh has their defaults). DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options, fixed for the whole sweep (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

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

task=refcoco
gen_subset=${dataset}_${split}
# OFA's evaluation arguments: exactly four location tokens
mue_sweep --beam="${beam}" --min-len=4 --max-len-a=0 --max-len-b=4 --no-repeat-ngram-size=3
