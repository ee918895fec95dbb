#!/usr/bin/env bash
# Evaluate a VQA (vqa_gen) checkpoint with MuE exits: VQA accuracy (OFA's soft score), exit
# statistics, expected and measured time (mue_fairseq.cli.evaluate, one process: on a GPU when
# nvidia-smi lists one, else the CPU). Inference as OFA's scripts: all-candidate scoring by default
# (evaluate_vqa_base_allcand.sh: every ans2label answer scored in teacher-forced passes; the
# candidates of one question exit together), or inference=beamsearch (evaluate_vqa_beam_base.sh:
# beam 5 over the answer trie, unnormalised scores; exits per decoder token).
#
#   bash run_scripts/vqa/evaluate_vqa_mue.sh val
#   inference=beamsearch img_thres=0.9 bash run_scripts/vqa/evaluate_vqa_mue.sh val
#   calibration=results/vqa_mue_sweep/val_calibration.json bash run_scripts/vqa/evaluate_vqa_mue.sh val
#
# The first argument is the split (val or test). Thresholds: img_thres / txt_thres / decoder_thres,
# or those of a sweep's calibration JSON (calibration=...); 1 disables a stream's exits. Nobody has
# published MuE thresholds for VQA: the defaults (1) evaluate at full depth; calibrate them with
# sweep_vqa_mue.sh. MuE timed with batch_size=1 on one GPU. ema_eval=1 evaluates the EMA weights the
# checkpoint stores (trained with --store-ema, as train_vqa_mue.sh does), as OFA's scripts do with --ema-eval.
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# mue_args: more evaluate options (e.g. "--mue-kv-policy copy").
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# val or test
split=${1:-${split:-val}}

data_dir=${data_dir:-${repo}/dataset/vqa_data}
data=${data:-${data_dir}/vqa_${split}.tsv}
ans2label_file=${ans2label_file:-${data_dir}/trainval_ans2label.pkl}
path=${path:-${repo}/checkpoints/vqa_base_mue_best.pt}
selected_cols=${selected_cols:-0,5,2,3,4}
# allcand or beamsearch
inference=${inference:-allcand}
result_path=${result_path:-${repo}/results/vqa_mue_${split}_${inference}}
valid_batch_size=${valid_batch_size:-20}

case "${inference}" in
  allcand)
    batch_size=${batch_size:-8}
    inference_args=()
    ;;
  beamsearch)
    batch_size=${batch_size:-16}
    beam=${beam:-5}
    inference_args=(--beam-search-vqa-eval --beam="${beam}" --unnormalized --temperature=1.0)
    ;;
  *)
    echo "inference=${inference}: choose allcand or beamsearch" >&2
    exit 2
    ;;
esac

img_thres=${img_thres:-1}
txt_thres=${txt_thres:-1}
decoder_thres=${decoder_thres:-1}

task=vqa_gen
gen_subset=${split}
more_overrides=",\"ans2label_file\":\"${ans2label_file}\",\"valid_batch_size\":${valid_batch_size}"
ema_args=()
if [ "${ema_eval:-0}" = "1" ]; then
  ema_args=(--ema-eval)
fi
mue_evaluate_with_exits ${inference_args[@]+"${inference_args[@]}"} ${ema_args[@]+"${ema_args[@]}"}
