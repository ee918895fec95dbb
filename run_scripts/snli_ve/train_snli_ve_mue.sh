#!/usr/bin/env bash
# Fine-tune OFA-Base on SNLI-VE with MuE's layer-wise loss (mue_layerwise_ce), from the pretrained
# OFA checkpoint, with OFA's / MuE's hyperparameters (MUE_SPEC.md A.7). One process per GPU when
# nvidia-smi lists GPUs, else NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/snli_ve/train_snli_ve_mue.sh
#   data_dir=/data/snli_ve_data restore_file=/ckpt/ofa_base.pt lr=5e-5 bash run_scripts/snli_ve/train_snli_ve_mue.sh
#
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-7061}

log_dir=${log_dir:-./logs}
save_dir=${save_dir:-./checkpoints}

data_dir=${data_dir:-${repo}/dataset/snli_ve_data}
data=${data:-${data_dir}/snli_ve_train.tsv,${data_dir}/snli_ve_dev.tsv}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,2,3,4,5}

task=snli_ve
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.0}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-5}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-4}
update_freq=${update_freq:-8}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
max_tgt_length=${max_tgt_length:-20}
patch_image_size=${patch_image_size:-480}
prompt_type=${prompt_type:-prev_output}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

log_file=${log_file:-${log_dir}/${max_epoch}_${lr}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${lr}}

mue_train \
    --label-smoothing="${label_smoothing}" --keep-best-checkpoints=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --best-checkpoint-metric=snli_score --maximize-best-checkpoint-metric \
    --prompt-type="${prompt_type}" --add-caption
