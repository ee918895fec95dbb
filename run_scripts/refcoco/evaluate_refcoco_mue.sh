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
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

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

task=refcoco
gen_subset=${dataset}_${split}
# OFA's evaluation arguments: exactly four location tokens
mue_evaluate_with_exits --beam="${beam}" --min-len=4 --max-len-a=0 --max-len-b=4 --no-repeat-ngram-size=3
