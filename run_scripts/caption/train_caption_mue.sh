#!/usr/bin/env bash
# Caption stage 1 (cross-entropy) fine-tuning of OFA-Base with MuE's layer-wise loss
# (mue_layerwise_ce), from the pretrained OFA checkpoint, with OFA's / MuE's hyperparameters
# (MUE_SPEC.md A.7); validated by CIDEr. One process per GPU when nvidia-smi lists GPUs, else
# NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/caption/train_caption_mue.sh
#   data_dir=/data/caption_data restore_file=/ckpt/ofa_base.pt bash run_scripts/caption/train_caption_mue.sh
#
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-1061}

log_dir=${log_dir:-./stage1_logs}
save_dir=${save_dir:-./stage1_checkpoints}

data_dir=${data_dir:-${repo}/dataset/caption_data}
data=${data:-${data_dir}/caption_stage1_train.tsv,${data_dir}/caption_val.tsv}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,4,2}

task=caption
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.1}
lr=${lr:-1e-5}
max_epoch=${max_epoch:-5}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-2}
update_freq=${update_freq:-4}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
max_tgt_length=${max_tgt_length:-20}
patch_image_size=${patch_image_size:-480}
eval_cider_cached=${eval_cider_cached:-${data_dir}/cider_cached_tokens/coco-valid-words.p}
drop_worst_ratio=${drop_worst_ratio:-0.2}
drop_worst_after=${drop_worst_after:-6000}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

log_file=${log_file:-${log_dir}/${max_epoch}_${warmup_ratio}_${drop_worst_after}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${warmup_ratio}_${drop_worst_after}}

echo "drop_worst_after ${drop_worst_after}" >&2
mue_train \
    --label-smoothing="${label_smoothing}" --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --eval-cider --eval-cider-cached-tokens="${eval_cider_cached}" \
    --eval-args='{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}' \
    --best-checkpoint-metric=cider --maximize-best-checkpoint-metric \
    --freeze-encoder-embedding --freeze-decoder-embedding \
    --drop-worst-ratio="${drop_worst_ratio}" --drop-worst-after="${drop_worst_after}"
