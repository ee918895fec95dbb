#!/usr/bin/env bash
# Caption stage 2: self-critical sequence training (OFA's scst_reward_criterion, CIDEr-D reward
# with a leave-one-out baseline over 5 beam samples), from a stage-1 checkpoint (OFA's
# caption_stage1_base_best.pt or one trained with train_caption_mue.sh), with the hyperparameters
# of OFA's run_scripts/caption/train_caption_stage2_base.sh; validated by CIDEr. One process per GPU
# when nvidia-smi lists GPUs, else NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/caption/train_caption_stage2_mue.sh
#   data_dir=/data/caption_data restore_file=/ckpt/caption_stage1_best.pt \
#       bash run_scripts/caption/train_caption_stage2_mue.sh
#
# data_dir holds OFA's caption_stage2_train.tsv (one row per image, its captions joined by &&),
# caption_val.tsv and cider_cached_tokens/coco-{train,valid}-words.p, as data_utils/convert_coco.py
# (--stage2-train) and data_utils/synthetic_task.py write them. Every variable below can be set
# from the environment. DRY_RUN=1 prints the command instead. extra_args: more training options
# (e.g. "--mue-image-threshold 0.9 --mue-text-threshold 0.9 --mue-decoder-threshold 0.9" to also
# validate with exits).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-1062}

log_dir=${log_dir:-./stage2_logs}
save_dir=${save_dir:-./stage2_checkpoints}

data_dir=${data_dir:-${repo}/dataset/caption_data}
data=${data:-${data_dir}/caption_stage2_train.tsv,${data_dir}/caption_val.tsv}
restore_file=${restore_file-${repo}/checkpoints/caption_stage1_base_best.pt}
selected_cols=${selected_cols:-1,4,2}

task=caption
criterion=${criterion:-scst_reward_criterion}
lr=${lr:-1e-5}
max_epoch=${max_epoch:-3}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-2}
update_freq=${update_freq:-4}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.0}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.0}
dropout=${dropout:-0.0}
max_tgt_length=${max_tgt_length:-20}
patch_image_size=${patch_image_size:-480}
eval_cider_cached=${eval_cider_cached:-${data_dir}/cider_cached_tokens/coco-valid-words.p}
scst_cider_cached=${scst_cider_cached:-${data_dir}/cider_cached_tokens/coco-train-words.p}
scst_args=${scst_args:-'{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}'}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

for file in "${scst_cider_cached}" "${eval_cider_cached}"; do
  if [ "${DRY_RUN:-0}" != "1" ] && [ ! -f "${file}" ]; then
    echo "CIDEr-D cached tokens not found: ${file}" \
      "(set data_dir=..., or scst_cider_cached=... / eval_cider_cached=...)" >&2
    exit 1
  fi
done

log_file=${log_file:-${log_dir}/${lr}_${max_epoch}.log}
save_path=${save_path:-${save_dir}/${lr}_${max_epoch}}

# no label smoothing: the SCST criterion has none
mue_train \
    --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --eval-cider --eval-cider-cached-tokens="${eval_cider_cached}" \
    --eval-args='{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}' \
    --best-checkpoint-metric=cider --maximize-best-checkpoint-metric \
    --freeze-encoder-embedding --freeze-decoder-embedding \
    --scst --scst-cider-cached-tokens="${scst_cider_cached}" --scst-args="${scst_args}"
