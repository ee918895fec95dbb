#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite on the CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/run_scripts/setup_env.sh"
cd "$root"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec "${MUE_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
