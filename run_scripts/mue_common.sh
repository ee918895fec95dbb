# Shared by the MuE run scripts (sourced, not run): repository paths, python, devices, DRY_RUN.
#
# Sets:
#   repo            the repository root
#   shared_dir      $shared_dir, else <repo>/../shared (OFA's BPE files are in its ofa_bpe/)
#   bpe_dir user_dir arch resnet_drop_path_rate attention_dropout max_src_length num_bins
#                   the training scripts' shared defaults (each from the environment when set)
#   PYTHON          $PYTHON, else $MUE_VENV/bin/python (default <repo>/.venv) when it exists, else python3
#   n_gpu           GPUs that nvidia-smi lists (restricted to CUDA_VISIBLE_DEVICES when set)
#   nproc           processes: $NPROC, else one per GPU, else 1 (CPU)
#   device_kind     GPU or CPU
#   device_args     --cpu without GPUs
#   launch_env      env MUE_CPU_DISTRIBUTED=1 without GPUs (prefix of training commands: the plugin's
#                   CPU support for torchrun's processes, see mue_fairseq/distributed_cpu.py)
#   train_fp16_args / eval_fp16_args   OFA's fp16 flags on GPUs (FP16=0 turns them off)
# and the functions run / run_logged / make_dirs, which only print the command (shell-quoted)
# when DRY_RUN=1, and mue_train, the training command the train_*_mue.sh scripts share.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared_dir=${shared_dir:-$(cd "${repo}/.." && pwd)/shared}

if [ -z "${PYTHON:-}" ]; then
  venv_python="${MUE_VENV:-${repo}/.venv}/bin/python"
  if [ -x "${venv_python}" ]; then PYTHON="${venv_python}"; else PYTHON=python3; fi
fi

# Training defaults that every train_*_mue.sh script shares (OFA-Base's); the environment overrides.
bpe_dir=${bpe_dir:-${shared_dir}/ofa_bpe}
user_dir=${user_dir:-${repo}/mue_fairseq}
arch=${arch:-mue_ofa_base}
resnet_drop_path_rate=${resnet_drop_path_rate:-0.0}
attention_dropout=${attention_dropout:-0.0}
max_src_length=${max_src_length:-80}
num_bins=${num_bins:-1000}

n_gpu=0
if command -v nvidia-smi >/dev/null 2>&1; then
  n_gpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  if [ "${n_gpu}" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
    n_gpu=$(printf '%s' "${CUDA_VISIBLE_DEVICES}" | tr ',' '\n' | grep -c '[^[:space:]]' || true)
  fi
fi

if [ "${n_gpu}" -gt 0 ]; then
  device_kind=GPU
  nproc=${NPROC:-${n_gpu}}
  device_args=()
  launch_env=()
  if [ "${FP16:-1}" = "1" ]; then
    train_fp16_args=(--fp16 --fp16-scale-window=512)
    eval_fp16_args=(--fp16)
  else
    train_fp16_args=()
    eval_fp16_args=()
  fi
else
  device_kind=CPU
  nproc=${NPROC:-1}
  device_args=(--cpu)
  launch_env=(env MUE_CPU_DISTRIBUTED=1)
  train_fp16_args=()
  eval_fp16_args=()
fi

run() {
  if [ "${DRY_RUN:-0}" = "1" ]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# run_logged LOG_FILE COMMAND...: run, copying the output to LOG_FILE.
run_logged() {
  local log_file=$1
  shift
  if [ "${DRY_RUN:-0}" = "1" ]; then
    run "$@"
  else
    "$@" 2>&1 | tee "${log_file}"
  fi
}

make_dirs() {
  if [ "${DRY_RUN:-0}" != "1" ]; then
    mkdir -p "$@"
  fi
}

# split_words NAME STRING: the words of STRING (extra options from the environment) into array NAME.
split_words() {
  read -r -a "$1" <<< "${2:-}"
}

# check_data DATA: each comma-separated file of DATA (training file(s), then the validation file)
# exists, else a message naming the missing one (the task would fail later, in every process).
check_data() {
  local files file
  IFS=',' read -r -a files <<< "$1"
  if [ "${#files[@]}" -lt 2 ]; then
    echo "data=$1: expected training file(s) and a validation file, comma-separated" >&2
    return 1
  fi
  for file in "${files[@]}"; do
    if [ ! -f "${file}" ]; then
      echo "data file not found: ${file} (set data_dir=... or data=...)" >&2
      return 1
    fi
  done
}

# mue_train [TASK OPTIONS...]: fine-tune with OFA's train.py command line (python -m
# mue_fairseq.cli.train, which derives polynomial_decay's total and warm-up updates from
# --max-epoch and --warmup-ratio as OFA does), one torchrun process per GPU or NPROC CPU processes,
# logged to log_file. The options every MuE training script shares come from the variables the
# script sets: data selected_cols bpe_dir user_dir restore_file save_path task arch criterion
# batch_size update_freq resnet_drop_path_rate encoder_drop_path_rate decoder_drop_path_rate
# dropout attention_dropout lr max_epoch warmup_ratio max_src_length max_tgt_length num_bins
# patch_image_size; the script's own options follow them, then extra_args (the environment's).
mue_train() {
  if [ -n "${total_num_update:-}${warmup_updates:-}" ]; then
    # read by these scripts before they scheduled by --warmup-ratio; ignoring them would change the run
    echo "total_num_update / warmup_updates are not read: the schedule comes from warmup_ratio and" \
      "max_epoch (OFA's --warmup-ratio); to give it in updates set warmup_ratio=0 and" \
      "extra_args=\"--total-num-update N --warmup-updates W\"" >&2
    return 2
  fi
  if [ "${DRY_RUN:-0}" != "1" ]; then
    check_data "${data}" || return 1
  fi
  make_dirs "${log_dir}" "${save_path}"
  local restore_args=() extra=()
  if [ -n "${restore_file}" ]; then
    restore_args=(--restore-file="${restore_file}" --reset-optimizer --reset-dataloader --reset-meters)
  fi
  split_words extra "${extra_args:-}"
  echo "${nproc} ${device_kind} process(es), ${max_epoch} epochs, lr ${lr}, warm-up ratio ${warmup_ratio}" >&2
  local shared=(
    "${data}" --selected-cols="${selected_cols}" --bpe-dir="${bpe_dir}" --user-dir="${user_dir}"
    ${restore_args[@]+"${restore_args[@]}"} --save-dir="${save_path}"
    --task="${task}" --arch="${arch}" --criterion="${criterion}"
    --batch-size="${batch_size}" --update-freq="${update_freq}"
    # OFA-Base's layer norms, shared embeddings and scaling, which its checkpoints need
    --encoder-normalize-before --decoder-normalize-before --share-decoder-input-output-embed
    --share-all-embeddings --layernorm-embedding --patch-layernorm-embedding --code-layernorm-embedding
    --add-type-embedding --scale-attn --scale-fc --scale-heads --disable-entangle
    --num-bins="${num_bins}" --patch-image-size="${patch_image_size}"
    --max-src-length="${max_src_length}" --max-tgt-length="${max_tgt_length}"
    # regularisation and optimisation
    --resnet-drop-path-rate="${resnet_drop_path_rate}" --encoder-drop-path-rate="${encoder_drop_path_rate}"
    --decoder-drop-path-rate="${decoder_drop_path_rate}" --dropout="${dropout}"
    --attention-dropout="${attention_dropout}"
    --optimizer=adam --adam-betas="(0.9,0.999)" --adam-eps=1e-08 --weight-decay=0.01 --clip-norm=1.0
    --lr-scheduler=polynomial_decay --lr="${lr}" --max-epoch="${max_epoch}" --warmup-ratio="${warmup_ratio}"
    # logging, validation once per epoch
    --log-format=simple --log-interval=10 --fixed-validation-seed=7 --save-interval=1 --validate-interval=1
    --find-unused-parameters --num-workers=0
    ${train_fp16_args[@]+"${train_fp16_args[@]}"} ${device_args[@]+"${device_args[@]}"}
  )
  run_logged "${log_file}" ${launch_env[@]+"${launch_env[@]}"} \
    "${PYTHON}" -m torch.distributed.run --nproc_per_node="${nproc}" --master_port="${MASTER_PORT}" \
    -m mue_fairseq.cli.train "${shared[@]}" "$@" ${extra[@]+"${extra[@]}"}
}

# mue_evaluate MODULE [OPTIONS...]: python -m mue_fairseq.cli.MODULE (evaluate or sweep) on the
# file ${data}, with the options every evaluate and sweep script shares (from the variables path
# task batch_size gen_subset result_path), then OPTIONS, then mue_args (the environment's), then
# the model overrides: data, bpe_dir, selected_cols and ${more_overrides} (more "key":value pairs,
# each after a comma).
mue_evaluate() {
  local module=$1 extra=()
  shift
  split_words extra "${mue_args:-}"
  run "${PYTHON}" -m "mue_fairseq.cli.${module}" "${data}" \
    --path="${path}" --user-dir="${user_dir}" --task="${task}" --batch-size="${batch_size}" \
    --gen-subset="${gen_subset}" --results-path="${result_path}" \
    --log-format=simple --log-interval=10 --seed=7 --num-workers=0 \
    ${eval_fp16_args[@]+"${eval_fp16_args[@]}"} ${device_args[@]+"${device_args[@]}"} \
    "$@" ${extra[@]+"${extra[@]}"} \
    --model-overrides="{\"data\":\"${data}\",\"bpe_dir\":\"${bpe_dir}\",\"selected_cols\":\"${selected_cols}\"${more_overrides:-}}"
}

# mue_evaluate_with_exits [OPTIONS...]: mue_evaluate evaluate at the exit thresholds img_thres
# txt_thres decoder_thres, or those of a sweep's calibration JSON when calibration=... is set.
mue_evaluate_with_exits() {
  if [ -n "${calibration:-}" ]; then
    read -r img_thres txt_thres decoder_thres < <("${PYTHON}" -c '
import json, sys
chosen = json.load(open(sys.argv[1]))["thresholds"]
print(*(chosen[f"mue_{stream}_threshold"] for stream in ("image", "text", "decoder")))' "${calibration}")
  fi
  mue_evaluate evaluate --mue-image-threshold="${img_thres}" --mue-text-threshold="${txt_thres}" \
    --mue-decoder-threshold="${decoder_thres}" "$@"
}

# mue_sweep [OPTIONS...]: mue_evaluate sweep over the grid image_thresholds text_thresholds
# decoder_thresholds (default 1,0.97,0.95,0.9 each) with search (grid), target (0.99), repeats (1),
# warmup_batches (2) and, unless calibrate=0, --calibrate.
mue_sweep() {
  local calibrate_args=()
  if [ "${calibrate:-1}" = "1" ]; then
    calibrate_args=(--calibrate)
  fi
  mue_evaluate sweep \
    --image-thresholds="${image_thresholds:-1,0.97,0.95,0.9}" \
    --text-thresholds="${text_thresholds:-1,0.97,0.95,0.9}" \
    --decoder-thresholds="${decoder_thresholds:-1,0.97,0.95,0.9}" \
    --search="${search:-grid}" --target="${target:-0.99}" --repeats="${repeats:-1}" \
    --warmup-batches="${warmup_batches:-2}" ${calibrate_args[@]+"${calibrate_args[@]}"} "$@"
}
