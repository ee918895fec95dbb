#!/usr/bin/env bash
# The main job on the built-in task: set up, generate data, fine-tune, compare full depth and MuE.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/setup_env.sh"
cd "$root"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec "${MUE_VENV:-$root/.venv}/bin/python" -m mue_fairseq.cli.quickstart "$@"
