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
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-8314}

log_dir=${log_dir:-./vqa_logs}
save_dir=${save_dir:-./vqa_checkpoints}

bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}
user_dir=${user_dir:-${repo}/mue_fairseq}

data_dir=${data_dir:-${repo}/dataset/vqa_data}
data=${data:-${data_dir}/vqa_train.tsv,${data_dir}/vqa_val.tsv}
ans2label_file=${ans2label_file:-${data_dir}/trainval_ans2label.pkl}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,5,2,3,4}

task=vqa_gen
arch=${arch:-mue_ofa_base}
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.1}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-15}
warmup_ratio=${warmup_ratio:-0.04}
batch_size=${batch_size:-4}
update_freq=${update_freq:-4}
resnet_drop_path_rate=${resnet_drop_path_rate:-0.0}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
attention_dropout=${attention_dropout:-0.0}
max_src_length=${max_src_length:-80}
max_object_length=${max_object_length:-30}
max_tgt_length=${max_tgt_length:-30}
num_bins=${num_bins:-1000}
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

# fairseq's polynomial_decay has no --warmup-ratio (OFA's fork has): both counts come from the data.
total_num_update=${total_num_update:-$(train_updates "${data}" "${batch_size}" "${update_freq}" "${max_epoch}")}
warmup_updates=${warmup_updates:-$(awk -v t="${total_num_update}" -v r="${warmup_ratio}" 'BEGIN { print int(t * r) }')}

log_file=${log_file:-${log_dir}/${max_epoch}_${warmup_ratio}_${lr}_${patch_image_size}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${warmup_ratio}_${lr}_${patch_image_size}}
make_dirs "${log_dir}" "${save_path}"

restore_args=()
if [ -n "${restore_file}" ]; then
  restore_args=(--restore-file="${restore_file}" --reset-optimizer --reset-dataloader --reset-meters)
fi
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
split_words extra "${extra_args:-}"

echo "max_epoch ${max_epoch}, warmup_ratio ${warmup_ratio}, lr ${lr}, patch_image_size ${patch_image_size}" >&2
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
    --keep-last-epochs=15 \
    --save-interval=1 --validate-interval=1 \
    --best-checkpoint-metric=vqa_score --maximize-best-checkpoint-metric \
    --max-src-length="${max_src_length}" \
    --max-object-length="${max_object_length}" \
    --max-tgt-length="${max_tgt_length}" \
    --find-unused-parameters \
    ${freeze_args[@]+"${freeze_args[@]}"} \
    "${answer_args[@]}" \
    --valid-batch-size="${valid_batch_size}" \
    --add-type-embedding \
    --scale-attn \
    --scale-fc \
    --scale-heads \
    --disable-entangle \
    --num-bins="${num_bins}" \
    --patch-image-size="${patch_image_size}" \
    --prompt-type="${prompt_type}" \
    ${object_args[@]+"${object_args[@]}"} \
    ${ema_args[@]+"${ema_args[@]}"} \
    --val-inference-type="${val_inference_type}" \
    --ignore-unused-valid-subsets \
    ${train_fp16_args[@]+"${train_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    ${extra[@]+"${extra[@]}"}
