#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv by default).
# fairseq-fixed is compiled against the torch installed here (no build isolation, no wheel cache),
# and installed without its torchaudio requirement (see ../shared/NOTES-env.md).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MUE_VENV:-$root/.venv}"
stamp="$venv/.mue-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt "$root/constraints.txt" ] && [ "$stamp" -nt "$root/pyproject.toml" ]; then
  exit 0
fi
echo "[setup] creating $venv (first run builds fairseq's extensions: about 3 minutes)" >&2
python3.11 -m venv "$venv" 2>/dev/null || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q -c "$root/constraints.txt" torch numpy cython wheel setuptools
"${pip[@]}" install -q --no-cache-dir --no-build-isolation --no-deps -c "$root/constraints.txt" fairseq-fixed
"${pip[@]}" install -q -c "$root/constraints.txt" hydra-core omegaconf regex sacrebleu bitarray cffi tqdm \
  packaging scikit-learn pillow pycocoevalcap matplotlib pytest
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$root"
touch "$stamp"
echo "[setup] done: $venv" >&2
