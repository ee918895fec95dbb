#!/usr/bin/env bash
# From an OFA caption checkpoint to calibrated MuE, the steps benchmarks/bench_journey.py measures:
#   reference  the start's CIDEr-D on val at full depth, as OFA computes it (no MuE option: OFA's model);
#   finetune   the layer-wise loss from the start (train_caption_mue.sh with restore_file=start);
#   calibrate  a threshold sweep of the fine-tuned checkpoint on val, keeping target x the *start's*
#              CIDEr-D (sweep_caption_mue.sh with --reference-quality), not the fine-tuned model's;
#   evaluate   test with the calibrated thresholds (evaluate_caption_mue.sh calibration=...).
#
#   start=/ckpt/caption_base_best.pt data_dir=/data/caption_data bash run_scripts/caption/journey_caption_mue.sh
#
# start: the OFA checkpoint (required); work_dir: where each step writes (default ./journey);
# target: fraction of the start's CIDEr-D to keep (0.96); steps: the steps to run, comma-separated
# (default all four; a later step reads what an earlier run wrote in work_dir). The steps' own
# variables (lr, max_epoch, image_thresholds, search, batch_size, ...) pass through to their scripts.
# DRY_RUN=1 prints each step's command (the start's quality as REFERENCE).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/../mue_common.sh"

start=${start:?set start=... to the OFA caption checkpoint to start from}
data_dir=${data_dir:-${repo}/dataset/caption_data}
work_dir=${work_dir:-./journey}
target=${target:-0.96}
steps=${steps:-reference,finetune,calibrate,evaluate}
val_split=${val_split:-val}
tuned=${work_dir}/tuned/checkpoint_best.pt
reference_scores=${work_dir}/reference/${val_split}_scores.json
calibration_file=${work_dir}/sweep/${val_split}_calibration.json
export data_dir

wants() { [[ ",${steps}," == *",$1,"* ]]; }

if [ "${DRY_RUN:-0}" != "1" ] && [ ! -f "${start}" ]; then
  echo "start=${start}: no such checkpoint" >&2
  exit 2
fi

if wants reference; then
  echo "== reference: ${start} on ${val_split}, full depth" >&2
  (
    data=${data_dir}/caption_${val_split}.tsv path=${start} result_path=${work_dir}/reference
    selected_cols=${selected_cols:-1,4,2} batch_size=${batch_size:-16} task=caption gen_subset=${val_split}
    more_overrides=",\"eval_cider\":False" mue_args=""
    make_dirs "${result_path}"
    mue_evaluate evaluate --beam=5 --max-len-b=16 --no-repeat-ngram-size=3 --no-plots
  )
fi

if wants finetune; then
  echo "== finetune: mue_layerwise_ce from ${start}" >&2
  restore_file=${start} save_path=${work_dir}/tuned log_dir=${work_dir}/logs "${BASH}" "${here}/train_caption_mue.sh"
fi

if wants calibrate; then
  if [ -f "${reference_scores}" ]; then
    reference=$("${PYTHON}" -c 'import json, sys; s = json.load(open(sys.argv[1])); print(s.get("CIDEr", s.get("cider_d")))' \
      "${reference_scores}")
  elif [ "${DRY_RUN:-0}" = "1" ]; then
    reference=REFERENCE
  else
    echo "calibrate: ${reference_scores} not found (run the reference step first)" >&2
    exit 2
  fi
  echo "== calibrate: ${tuned} on ${val_split}, keeping ${target} x ${reference}" >&2
  path=${tuned} result_path=${work_dir}/sweep target=${target} search=${search:-coordinate} \
    mue_args="--reference-quality ${reference} ${mue_args:-}" "${BASH}" "${here}/sweep_caption_mue.sh" "${val_split}"
fi

if wants evaluate; then
  echo "== evaluate: ${tuned} on test with ${calibration_file}" >&2
  if [ "${DRY_RUN:-0}" = "1" ] && [ ! -f "${calibration_file}" ]; then
    calibration="" img_thres=CALIBRATED txt_thres=CALIBRATED decoder_thres=CALIBRATED \
      path=${tuned} result_path=${work_dir}/test "${BASH}" "${here}/evaluate_caption_mue.sh" test
  else
    calibration=${calibration_file} path=${tuned} result_path=${work_dir}/test \
      "${BASH}" "${here}/evaluate_caption_mue.sh" test
  fi
fi
