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
# Every variable below, and those ../mue_common.sh defaults, can be set from the environment.
# DRY_RUN=1 prints the command instead.
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

data_dir=${data_dir:-${repo}/dataset/${dataset}_data}
data=${data:-${data_dir}/${dataset}_train.tsv,${data_dir}/${dataset}_val.tsv}
restore_file=${restore_file-${repo}/checkpoints/ofa_base.pt}
selected_cols=${selected_cols:-0,4,2,3}

task=refcoco
criterion=${criterion:-mue_layerwise_ce}
label_smoothing=${label_smoothing:-0.1}
lr=${lr:-5e-5}
max_epoch=${max_epoch:-${default_max_epoch}}
warmup_ratio=${warmup_ratio:-0.06}
batch_size=${batch_size:-4}
update_freq=${update_freq:-8}
encoder_drop_path_rate=${encoder_drop_path_rate:-0.1}
decoder_drop_path_rate=${decoder_drop_path_rate:-0.1}
dropout=${dropout:-0.1}
max_tgt_length=${max_tgt_length:-20}
patch_image_size=${patch_image_size:-512}
save_interval_updates=${save_interval_updates:-500}
validate_interval_updates=${validate_interval_updates:-500}

log_file=${log_file:-${log_dir}/${max_epoch}_${lr}_${patch_image_size}.log}
save_path=${save_path:-${save_dir}/${max_epoch}_${lr}_${patch_image_size}}

echo "dataset ${dataset}, patch_image_size ${patch_image_size}" >&2
mue_train \
    --label-smoothing="${label_smoothing}" --no-epoch-checkpoints --keep-best-checkpoints=1 \
    --save-interval-updates="${save_interval_updates}" --validate-interval-updates="${validate_interval_updates}" \
    --eval-acc --eval-args='{"beam":5,"min_len":4,"max_len_a":0,"max_len_b":4}' \
    --best-checkpoint-metric=score --maximize-best-checkpoint-metric
