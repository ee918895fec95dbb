#!/usr/bin/env bash
# Fine-tune OFA-Base on SNLI-VE with MuE's layer-wise loss (mue_layerwise_ce), from the pretrained
# OFA checkpoint, with OFA's / MuE's hyperparameters (MUE_SPEC.md A.7). One process per GPU when
# nvidia-smi lists GPUs, else NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/snli_ve/train_snli_ve_mue.sh
#   data_dir=/data/snli_ve_data restore_file=/ckpt/ofa_base.pt lr=5e-5 bash run_scripts/snli_ve/train_snli_ve_mue.sh
#
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-7061}

log_dir=${log_dir:-./logs}
save_dir=${save_dir:-./checkpoints}

bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}
user_dir=${user_dir:-${repo}/mue_fairseq}

data_dir=${data_dir:-${repo}/dataset/snli_ve_data}
data=${data:-${data_dir}/snli_ve_train.tsv,${data_dir}/snli_ve_dev.tsv}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,2,3,4,5}

task=snli_ve
arch=${arch:-mue_ofa_base}
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.0}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-5}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-4}
update_freq=${update_freq:-8}
resnet_drop_path_rate=${resnet_drop_path_rate:-0.0}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
attention_dropout=${attention_dropout:-0.0}
max_src_length=${max_src_length:-80}
max_tgt_length=${max_tgt_length:-20}
num_bins=${num_bins:-1000}
patch_image_size=${patch_image_size:-480}
prompt_type=${prompt_type:-prev_output}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

# fairseq's polynomial_decay has no --warmup-ratio (OFA's fork has): both counts come from the data.
total_num_update=${total_num_update:-$(train_updates "${data}" "${batch_size}" "${update_freq}" "${max_epoch}")}
warmup_updates=${warmup_updates:-$(awk -v t="${total_num_update}" -v r="${warmup_ratio}" 'BEGIN { print int(t * r) }')}

log_file=${log_file:-${log_dir}/${max_epoch}_${lr}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${lr}}
make_dirs "${log_dir}" "${save_path}"

restore_args=()
if [ -n "${restore_file}" ]; then
  restore_args=(--restore-file="${restore_file}" --reset-optimizer --reset-dataloader --reset-meters)
fi
split_words extra "${extra_args:-}"

echo "max_epoch ${max_epoch}, lr ${lr}" >&2
echo "${nproc} ${device_kind} process(es), ${total_num_update} updates, ${warmup_updates} warmup" >&2

run_logged "${log_file}" ${launch_env[@]+"${launch_env[@]}"} \
    "${PYTHON}" -m torch.distributed.run --nproc_per_node="${nproc}" --master_port="${MASTER_PORT}" \
    -m fairseq_cli.train \
    "${data}" \
    --selected-cols="${selected_cols}" \
    --bpe-dir="${bpe_dir}" \
    --user-dir="${user_dir}" \
    ${restore_args[@]+"${restore_args[@]}"} \
    --save-dir="${save_path}" \
    --task="${task}" \
    --arch="${arch}" \
    --criterion="${criterion}" \
    --label-smoothing="${label_smoothing}" \
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
    --max-epoch="${max_epoch}" --total-num-update="${total_num_update}" --warmup-updates="${warmup_updates}" \
    --log-format=simple --log-interval=10 \
    --fixed-validation-seed=7 \
    --keep-best-checkpoints=1 \
    --save-interval=1 --validate-interval=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --best-checkpoint-metric=snli_score --maximize-best-checkpoint-metric \
    --max-src-length="${max_src_length}" \
    --max-tgt-length="${max_tgt_length}" \
    --find-unused-parameters \
    --add-type-embedding \
    --scale-attn \
    --scale-fc \
    --scale-heads \
    --disable-entangle \
    --num-bins="${num_bins}" \
    --patch-image-size="${patch_image_size}" \
    --prompt-type="${prompt_type}" \
    --add-caption \
    --ignore-unused-valid-subsets \
    ${train_fp16_args[@]+"${train_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    ${extra[@]+"${extra[@]}"}
