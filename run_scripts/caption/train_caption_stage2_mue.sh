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

bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}
user_dir=${user_dir:-${repo}/mue_fairseq}

data_dir=${data_dir:-${repo}/dataset/caption_data}
data=${data:-${data_dir}/caption_stage2_train.tsv,${data_dir}/caption_val.tsv}
restore_file=${restore_file-${repo}/checkpoints/caption_stage1_base_best.pt}
selected_cols=${selected_cols:-1,4,2}

task=caption
arch=${arch:-mue_ofa_base}
criterion=${criterion:-scst_reward_criterion}
lr=${lr:-1e-5}
max_epoch=${max_epoch:-3}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-2}
update_freq=${update_freq:-4}
resnet_drop_path_rate=${resnet_drop_path_rate:-0.0}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.0}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.0}
dropout=${dropout:-0.0}
attention_dropout=${attention_dropout:-0.0}
max_src_length=${max_src_length:-80}
max_tgt_length=${max_tgt_length:-20}
num_bins=${num_bins:-1000}
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
make_dirs "${log_dir}" "${save_path}"

restore_args=()
if [ -n "${restore_file}" ]; then
  restore_args=(--restore-file="${restore_file}" --reset-optimizer --reset-dataloader --reset-meters)
fi
split_words extra "${extra_args:-}"

echo "lr ${lr}, max_epoch ${max_epoch}, warmup_ratio ${warmup_ratio}" >&2
echo "${nproc} ${device_kind} process(es)" >&2

# OFA's train.py command line: mue_fairseq.cli.train derives the schedule from --warmup-ratio.
run_logged "${log_file}" ${launch_env[@]+"${launch_env[@]}"} \
    "${PYTHON}" -m torch.distributed.run --nproc_per_node="${nproc}" --master_port="${MASTER_PORT}" \
    -m mue_fairseq.cli.train \
    "${data}" \
    --selected-cols="${selected_cols}" \
    --bpe-dir="${bpe_dir}" \
    --user-dir="${user_dir}" \
    ${restore_args[@]+"${restore_args[@]}"} \
    --save-dir="${save_path}" \
    --task="${task}" \
    --arch="${arch}" \
    --criterion="${criterion}" \
    --batch-size="${batch_size}" \
    --update-freq="${update_freq}" \
    --encoder-normalize-before \
    --decoder-normalize-before \
    --share-decoder-input-output-embed \
    --share-all-embeddings \
    --layernorm-embedding \
    --patch-layernorm-embedding \
    --code-layernorm-embedding \
    --resnet-drop-path-rate="${resnet_drop_path_rate}" \
    --encoder-drop-path-rate="${encoder_drop_path_rate}" \
    --decoder-drop-path-rate="${decoder_drop_path_rate}" \
    --dropout="${dropout}" \
    --attention-dropout="${attention_dropout}" \
    --weight-decay=0.01 --optimizer=adam --adam-betas="(0.9,0.999)" --adam-eps=1e-08 --clip-norm=1.0 \
    --lr-scheduler=polynomial_decay --lr="${lr}" \
    --max-epoch="${max_epoch}" --warmup-ratio="${warmup_ratio}" \
    --log-format=simple --log-interval=10 \
    --fixed-validation-seed=7 \
    --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval=1 --validate-interval=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --eval-cider \
    --eval-cider-cached-tokens="${eval_cider_cached}" \
    --eval-args='{"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}' \
    --best-checkpoint-metric=cider --maximize-best-checkpoint-metric \
    --max-src-length="${max_src_length}" \
    --max-tgt-length="${max_tgt_length}" \
    --find-unused-parameters \
    --freeze-encoder-embedding \
    --freeze-decoder-embedding \
    --add-type-embedding \
    --scale-attn \
    --scale-fc \
    --scale-heads \
    --disable-entangle \
    --num-bins="${num_bins}" \
    --patch-image-size="${patch_image_size}" \
    --scst \
    --scst-cider-cached-tokens="${scst_cider_cached}" \
    --scst-args="${scst_args}" \
    ${train_fp16_args[@]+"${train_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    ${extra[@]+"${extra[@]}"}
