#!/usr/bin/env bash
# Early-exit speed on a GPU, one prepared run: OFA-Base shape (random weights) at 480 px
# (30x30 = 900 patches), float16 and float32, batch 1 and 32, fixed length 16 + eos, beam 1.
# For each dtype: OFA core vs MuE at thresholds 1 (overhead) and MuE with forced exits
# (image 3/6, text 2/6, decoder 3/6) vs full depth (speed-up, against the FLOP model).
#
# Results: benchmarks/results/exit_speed_cuda_<dtype>_480px_gpu.{json,csv} and the table
# benchmarks/results/gpu_speed_summary.md (also printed at the end).
# Needs: python with a CUDA build of torch and fairseq-fixed (set PYTHON=... to choose one).
# Expected time on one H200: a few minutes (model builds dominate).
#
#   bash benchmarks/gpu_speed.sh   # REPEATS=20 REPEATS_BATCHED=10 WARMUP=3 OVERHEAD_REPEATS=20 by default
#
# REPLAY=EXIT_STATS.json adds, per dtype, a replay of recorded exits (bench_exit_speed.py --replay:
# per-sample and per-token exit layers of a real evaluation, e.g.
# benchmarks/results/exit_stats_caption_quickstart_test.json) against full depth at the same shape,
# batch sizes REPLAY_BATCH_SIZES (default "1 16"), REPLAY_BATCH1_SAMPLES generations per round at
# batch 1 (default 8); results exit_speed_cuda_<dtype>_480px_replay_gpu.{json,csv}, in the summary
# marked "(replay)". REPLAY_ONLY=1 skips the forced-exit runs. (Written without a GPU at hand:
# the replay path is tested on the CPU only.)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
REPEATS=${REPEATS:-20}
REPEATS_BATCHED=${REPEATS_BATCHED:-10}
WARMUP=${WARMUP:-3}
OVERHEAD_REPEATS=${OVERHEAD_REPEATS:-20}
REPLAY=${REPLAY:-}
REPLAY_ONLY=${REPLAY_ONLY:-0}
REPLAY_BATCH_SIZES=${REPLAY_BATCH_SIZES:-1 16}
REPLAY_BATCH1_SAMPLES=${REPLAY_BATCH1_SAMPLES:-8}
if [ -n "$REPLAY" ] && [ ! -f "$REPLAY" ]; then
    echo "gpu_speed.sh: REPLAY=$REPLAY: no such file" >&2
    exit 1
fi
if [ "$REPLAY_ONLY" = "1" ] && [ -z "$REPLAY" ]; then
    echo "gpu_speed.sh: REPLAY_ONLY=1 needs REPLAY=EXIT_STATS.json" >&2
    exit 1
fi

"$PYTHON" - <<'PY'
import sys
try:
    import torch, fairseq  # noqa: F401
except ImportError as err:
    sys.exit(f"gpu_speed.sh: {err}; install torch (CUDA) and fairseq-fixed first")
if not torch.cuda.is_available():
    sys.exit("gpu_speed.sh: torch sees no CUDA device")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| fairseq", fairseq.__version__)
PY

mkdir -p "$OUT_DIR"
files=()
for dtype in float16 float32; do
    if [ "$REPLAY_ONLY" != "1" ]; then
        "$PYTHON" benchmarks/bench_exit_speed.py --device cuda --dtype "$dtype" --image-size 480 \
            --batch-sizes 1 32 --beam 1 --length 16 --warmup "$WARMUP" --warmup-batched "$WARMUP" --repeats "$REPEATS" \
            --repeats-batched "$REPEATS_BATCHED" --overhead-repeats "$OVERHEAD_REPEATS" --out-dir "$OUT_DIR" --tag _gpu
        files+=("$OUT_DIR/exit_speed_cuda_${dtype}_480px_gpu.json")
    fi
    if [ -n "$REPLAY" ]; then
        # shellcheck disable=SC2086  # REPLAY_BATCH_SIZES is a list of numbers
        "$PYTHON" benchmarks/bench_exit_speed.py --device cuda --dtype "$dtype" --image-size 480 \
            --batch-sizes $REPLAY_BATCH_SIZES --beam 1 --length 16 --warmup "$WARMUP" --warmup-batched "$WARMUP" \
            --repeats "$REPEATS" --repeats-batched "$REPEATS_BATCHED" --replay "$REPLAY" \
            --replay-batch1-samples "$REPLAY_BATCH1_SAMPLES" --out-dir "$OUT_DIR" --tag _gpu
        files+=("$OUT_DIR/exit_speed_cuda_${dtype}_480px_replay_gpu.json")
    fi
done

echo
"$PYTHON" benchmarks/bench_exit_speed.py --summarize "${files[@]}" | tee "$OUT_DIR/gpu_speed_summary.md"
