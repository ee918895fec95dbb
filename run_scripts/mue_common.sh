# Shared by the MuE run scripts (sourced, not run): repository paths, python, devices, DRY_RUN.
#
# Sets:
#   repo            the repository root
#   shared_dir      $shared_dir, else <repo>/../shared (OFA's BPE files are in its ofa_bpe/)
#   PYTHON          $PYTHON, else $MUE_VENV/bin/python (default <repo>/.venv) when it exists, else python3
#   n_gpu           GPUs that nvidia-smi lists (restricted to CUDA_VISIBLE_DEVICES when set)
#   nproc           processes: $NPROC, else one per GPU, else 1 (CPU)
#   device_kind     GPU or CPU
#   device_args     --cpu without GPUs
#   launch_env      env MUE_CPU_DISTRIBUTED=1 without GPUs (prefix of training commands: the plugin's
#                   CPU support for torchrun's processes, see mue_fairseq/distributed_cpu.py)
#   train_fp16_args / eval_fp16_args   OFA's fp16 flags on GPUs (FP16=0 turns them off)
# and the functions run / run_logged / make_dirs, which only print the command (shell-quoted)
# when DRY_RUN=1.

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
shared_dir=${shared_dir:-$(cd "${repo}/.." && pwd)/shared}

if [ -z "${PYTHON:-}" ]; then
  venv_python="${MUE_VENV:-${repo}/.venv}/bin/python"
  if [ -x "${venv_python}" ]; then PYTHON="${venv_python}"; else PYTHON=python3; fi
fi

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

# train_updates DATA BATCH_SIZE UPDATE_FREQ MAX_EPOCH: updates over MAX_EPOCH epochs of the
# training files (all files of DATA but the last, the validation file), as fairseq batches them:
# ceil(rows / batch) batches, sharded over nproc processes, grouped by UPDATE_FREQ.
train_updates() {
  local data=$1 batch_size=$2 update_freq=$3 max_epoch=$4
  local files rows=0 file count
  IFS=',' read -r -a files <<< "${data}"
  if [ "${#files[@]}" -lt 2 ]; then
    echo "data=${data}: expected training file(s) and a validation file, comma-separated" >&2
    return 1
  fi
  for file in "${files[@]:0:${#files[@]}-1}"; do
    if [ ! -f "${file}" ]; then
      echo "training file not found: ${file} (set data=..., or total_num_update=... and warmup_updates=...)" >&2
      return 1
    fi
    count=$(grep -c '' "${file}")
    rows=$((rows + count))
  done
  local files_per_epoch=$(( ${#files[@]} - 1 ))
  rows=$(( (rows + files_per_epoch - 1) / files_per_epoch ))  # epochs rotate over the training files
  local batches=$(( (rows + batch_size - 1) / batch_size ))
  local per_process=$(( (batches + nproc - 1) / nproc ))
  echo $(( (per_process + update_freq - 1) / update_freq * max_epoch ))
}
