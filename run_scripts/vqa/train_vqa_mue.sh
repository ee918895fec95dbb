#!/usr/bin/env bash
# Fine-tune OFA-Base on VQAv2 (task vqa_gen) with MuE's layer-wise loss (mue_layerwise_ce), from the
# pretrained OFA checkpoint, with OFA's VQA-Base hyperparameters (its train_vqa_base_distributed.sh:
# EMA validated with all-candidate inference, object labels added, frozen embeddings). Each row's
# answer confidence weights its loss, as in OFA. One process per GPU when nvidia-smi lists GPUs, else
# NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/vqa/train_vqa_mue.sh
#   data=/data/vqa_train_1.tsv,/data/vqa_train_2.tsv,/data/vqa_val.tsv bash run_scripts/vqa/train_vqa_mue.sh
#   val_inference_type=beamsearch unconstrained_training=1 bash run_scripts/vqa/train_vqa_mue.sh
#
# data: training file(s) (one per epoch when OFA's shuffled copies are listed) and the validation
# file last; data_utils/convert_vqa.py writes them (--rows-per-answer for training) and the
# ans2label pickle. unconstrained_training=1: open-ended answers (OFA ignores ans2label then).
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-8314}

log_dir=${log_dir:-./vqa_logs}
save_dir=${save_dir:-./vqa_checkpoints}

data_dir=${data_dir:-${repo}/dataset/vqa_data}
data=${data:-${data_dir}/vqa_train.tsv,${data_dir}/vqa_val.tsv}
ans2label_file=${ans2label_file:-${data_dir}/trainval_ans2label.pkl}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,5,2,3,4}

task=vqa_gen
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.1}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-15}
warmup_ratio=${warmup_ratio:-0.04}
batch_size=${batch_size:-4}
update_freq=${update_freq:-4}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
max_object_length=${max_object_length:-30}
max_tgt_length=${max_tgt_length:-30}
patch_image_size=${patch_image_size:-480}
prompt_type=${prompt_type:-prev_output}
valid_batch_size=${valid_batch_size:-20}
ema_decay=${ema_decay:-0.9999}
ema_start_update=${ema_start_update:-0}
uses_ema=${uses_ema:-1}
add_object=${add_object:-1}
# allcand (OFA's default: every candidate scored) or beamsearch (faster, about 0.5 lower)
val_inference_type=${val_inference_type:-allcand}
unconstrained_training=${unconstrained_training:-0}
# OFA fine-tunes VQA with its pre-trained embeddings frozen; 0 trains them (a model from scratch)
freeze_embeddings=${freeze_embeddings:-1}

log_file=${log_file:-${log_dir}/${max_epoch}_${warmup_ratio}_${lr}_${patch_image_size}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${warmup_ratio}_${lr}_${patch_image_size}}

ema_args=()
if [ "${uses_ema}" = "1" ]; then
  # fairseq keeps the EMA model (--store-ema); vqa_gen validates it (--uses-ema), as OFA does
  ema_args=(--uses-ema --store-ema --ema-fp32 --ema-decay="${ema_decay}" --ema-start-update="${ema_start_update}")
fi
answer_args=(--ans2label-file="${ans2label_file}")
if [ "${unconstrained_training}" = "1" ]; then
  answer_args=(--unconstrained-training)
fi
freeze_args=()
if [ "${freeze_embeddings}" = "1" ]; then
  freeze_args=(--freeze-encoder-embedding --freeze-decoder-embedding)
fi
object_args=()
if [ "${add_object}" = "1" ]; then
  object_args=(--add-object)
fi

echo "patch_image_size ${patch_image_size}, validation by ${val_inference_type}" >&2
mue_train \
    --label-smoothing="${label_smoothing}" --keep-last-epochs=15 \
    --best-checkpoint-metric=vqa_score --maximize-best-checkpoint-metric \
    ${freeze_args[@]+"${freeze_args[@]}"} \
    "${answer_args[@]}" --valid-batch-size="${valid_batch_size}" --prompt-type="${prompt_type}" \
    --max-object-length="${max_object_length}" \
    ${object_args[@]+"${object_args[@]}"} ${ema_args[@]+"${ema_args[@]}"} \
    --val-inference-type="${val_inference_type}"
