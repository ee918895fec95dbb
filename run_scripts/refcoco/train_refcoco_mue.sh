#!/usr/bin/env bash
# Fine-tune OFA-Base on visual grounding (task refcoco: RefCOCO, RefCOCO+ or RefCOCOg) with MuE's
# layer-wise loss (mue_layerwise_ce), from the pretrained OFA checkpoint, with OFA's Base
# hyperparameters (its train_refcoco_base.sh / train_refcocoplus_base.sh / train_refcocog_base.sh:
# lr 5e-5, 10 epochs, 12 for RefCOCOg, 512-pixel images); validated by Acc@0.5 of boxes generated
# with OFA's arguments (beam 5, exactly four location tokens). One process per GPU when nvidia-smi
# lists GPUs, else NPROC (default 1) CPU processes; torchrun starts them.
#
#   bash run_scripts/refcoco/train_refcoco_mue.sh
#   dataset=refcocog data_dir=/data/refcocog_data bash run_scripts/refcoco/train_refcoco_mue.sh
#
# dataset: refcoco, refcocoplus or refcocog (data_utils/convert_refcoco.py writes their TSVs).
# Every variable below can be set from the environment. DRY_RUN=1 prints the command instead.
# extra_args: more fairseq-train options (e.g. "--layer-reduction sum" for the authors' loss).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/mue_common.sh"

dataset=${dataset:-refcoco}
case "${dataset}" in
  refcoco | refcocoplus) default_max_epoch=10 ;;
  refcocog) default_max_epoch=12 ;;
  *)
    echo "dataset=${dataset}: choose refcoco, refcocoplus or refcocog" >&2
    exit 2
    ;;
esac

# The port for communication. Note that if you want to run multiple tasks on the same machine,
# you need to specify different port numbers.
export MASTER_PORT=${MASTER_PORT:-6051}

log_dir=${log_dir:-./${dataset}_logs}
save_dir=${save_dir:-./${dataset}_checkpoints}

bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}
user_dir=${user_dir:-${repo}/mue_fairseq}

data_dir=${data_dir:-${repo}/dataset/${dataset}_data}
data=${data:-${data_dir}/${dataset}_train.tsv,${data_dir}/${dataset}_val.tsv}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,4,2,3}

task=refcoco
arch=${arch:-mue_ofa_base}
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.1}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-${default_max_epoch}}
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
patch_image_size=${patch_image_size:-512}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

# fairseq's polynomial_decay has no --warmup-ratio (OFA's fork has): both counts come from the data.
total_num_update=${total_num_update:-$(train_updates "${data}" "${batch_size}" "${update_freq}" "${max_epoch}")}
warmup_updates=${warmup_updates:-$(awk -v t="${total_num_update}" -v r="${warmup_ratio}" 'BEGIN { print int(t * r) }')}

log_file=${log_file:-${log_dir}/${max_epoch}_${lr}_${patch_image_size}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${lr}_${patch_image_size}}
make_dirs "${log_dir}" "${save_path}"

restore_args=()
if [ -n "${restore_file}" ]; then
  restore_args=(--restore-file="${restore_file}" --reset-optimizer --reset-dataloader --reset-meters)
fi
split_words extra "${extra_args:-}"

echo "dataset ${dataset}, max_epoch ${max_epoch}, lr ${lr}, patch_image_size ${patch_image_size}" >&2
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
    --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval=1 --validate-interval=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --eval-acc \
    --eval-args='{"beam":5,"min_len":4,"max_len_a":0,"max_len_b":4}' \
    --best-checkpoint-metric=score --maximize-best-checkpoint-metric \
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
    --ignore-unused-valid-subsets \
    ${train_fp16_args[@]+"${train_fp16_args[@]}"} \
    ${device_args[@]+"${device_args[@]}"} \
    --num-workers=0 \
    ${extra[@]+"${extra[@]}"}
