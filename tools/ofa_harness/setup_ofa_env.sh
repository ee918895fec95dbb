#!/usr/bin/env bash
# Build OFA's own environment (OFA-Sys/OFA at a fixed commit, its bundled fairseq fork, Python 3.8,
# torch 1.8.1 on CPU) apart from ours, so tools/ofa_harness/compare.py can run OFA's evaluate.py.
#
#   tools/ofa_harness/setup_ofa_env.sh [OFA_GIT_DIR_OR_SOURCE_TREE]
#
# The OFA source comes from (first that is set): the argument, $OFA_SRC, $OFA_GIT_DIR, or the
# mirror at /work/.mirror/OFA-Sys+OFA/repo. A git directory (bare or not) is exported at
# $OFA_COMMIT; a plain directory is taken as an OFA source tree at that commit.
# Everything lands under $OFA_PEER_DIR (default work_dirs/ofa_peer/, gitignored):
#   src/     OFA source tree (with the two patches below)
#   venv/    Python 3.8 venv with OFA's requirements and `pip install -e src/fairseq`
#   wheels/  the torch 1.8.1 wheel (about 800 MB), downloaded once
# Idempotent: each finished step leaves a stamp file; rerunning skips it.
set -euo pipefail

OFA_COMMIT=${OFA_COMMIT:-a36b91ce86ff105ac8d9e513aa88f42b85e33479}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PEER=${OFA_PEER_DIR:-$ROOT/work_dirs/ofa_peer}
SRC_IN=${1:-${OFA_SRC:-${OFA_GIT_DIR:-/work/.mirror/OFA-Sys+OFA/repo}}}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$PEER"
log() { echo "[setup_ofa_env] $*"; }

# --- 1. OFA source tree -----------------------------------------------------------------------
if [ ! -f "$PEER/src/.ofa-commit" ] || [ "$(cat "$PEER/src/.ofa-commit")" != "$OFA_COMMIT" ]; then
    if [ ! -e "$SRC_IN" ]; then
        cat >&2 <<MSG
error: no OFA source at '$SRC_IN'.
Give a git directory or source tree of OFA-Sys/OFA as the first argument (or OFA_GIT_DIR=...), e.g.
  git clone https://github.com/OFA-Sys/OFA.git /tmp/OFA   # then: $0 /tmp/OFA
The commit used is $OFA_COMMIT (set OFA_COMMIT to override).
MSG
        exit 2
    fi
    rm -rf "$PEER/src" && mkdir -p "$PEER/src"
    GD=
    if git --git-dir="$SRC_IN" rev-parse --git-dir >/dev/null 2>&1; then GD=$SRC_IN
    elif [ -e "$SRC_IN/.git" ]; then GD=$(git -C "$SRC_IN" rev-parse --absolute-git-dir); fi
    if [ -n "$GD" ]; then
        git --git-dir="$GD" cat-file -e "$OFA_COMMIT^{commit}" || { echo "error: commit $OFA_COMMIT not in $GD" >&2; exit 2; }
        # Mirrors may lack a few large blobs (two demo images here); export only the files present.
        # (git archive may still print "invalid object" for a skipped file; the export is complete.)
        git --git-dir="$GD" ls-tree -r "$OFA_COMMIT" | awk '$2=="blob"{print $3"\t"$4}' > "$PEER/tree.txt"
        cut -f1 "$PEER/tree.txt" | git --git-dir="$GD" cat-file --batch-check | paste - "$PEER/tree.txt" \
            | awk -F'\t' '$1 !~ / missing$/ {print $3}' > "$PEER/present.txt"
        missing=$(( $(wc -l < "$PEER/tree.txt") - $(wc -l < "$PEER/present.txt") ))
        [ "$missing" -gt 0 ] && log "skipping $missing file(s) absent from the git directory: $(comm -23 <(cut -f2 "$PEER/tree.txt" | sort) <(sort "$PEER/present.txt") | tr '\n' ' ')"
        tr '\n' '\0' < "$PEER/present.txt" | xargs -0 git --git-dir="$GD" archive "$OFA_COMMIT" -- | tar -x -C "$PEER/src"
    else
        cp -a "$SRC_IN"/. "$PEER/src/"
    fi
    for f in evaluate.py train.py ofa_module/__init__.py fairseq/setup.py utils/BPE/encoder.json; do
        [ -f "$PEER/src/$f" ] || { echo "error: $PEER/src/$f missing: not an OFA source tree" >&2; exit 2; }
    done

    # Patch 1: the fork's fairseq/setup.py builds a C++ extension "alignment_train_cpu_binding" whose
    # source (examples/operators/alignment_train_cpu.cpp) is not in the repository, so the editable
    # install fails. Drop that one extension; nothing in OFA imports it.
    "${PYTHON38:-python3}" - "$PEER/src/fairseq/setup.py" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
pat = re.compile(r'\n\s*cpp_extension\.CppExtension\(\s*"alignment_train_cpu_binding",.*?\),', re.S)
s2, n = pat.subn("", s, count=1)
if n != 1 and "alignment_train_cpu_binding" in s:
    sys.exit(f"error: could not remove alignment_train_cpu_binding from {p}")
open(p, "w").write(s2)
PY
    # Patch 2: evaluate.py creates its two score accumulators with .cuda() unconditionally, which
    # fails on a machine without CUDA. Keep them on the CPU when CUDA is not used (use_cuda is
    # evaluate.py's own flag); model and generator code are untouched.
    sed -i 's/^\(\s*score_\(sum\|cnt\) = torch.FloatTensor(\[0\])\)\.cuda()$/\1.cuda() if use_cuda else torch.FloatTensor([0])/' "$PEER/src/evaluate.py"
    [ "$(grep -c 'torch.FloatTensor(\[0\]).cuda() if use_cuda else' "$PEER/src/evaluate.py")" = 2 ] \
        || { echo "error: evaluate.py patch did not apply" >&2; exit 2; }
    echo "$OFA_COMMIT" > "$PEER/src/.ofa-commit"
    log "OFA source at $PEER/src (commit $OFA_COMMIT, 2 patches)"
fi
# Patch 3, for train.py only (tools/ofa_harness/train_ofa_snli_ve.sh): with SNLI-VE's constraint
# masks, the training criterion assigns into the tuple the model returns (`net_output[0] = ...`, a
# TypeError at this commit); mask in place instead, as the criterion did before. Same values.
CRIT=$PEER/src/criterions/label_smoothed_cross_entropy.py
if grep -q 'net_output\[0\] = net_output\[0\].masked_fill(~constraint_masks, -math.inf)' "$CRIT"; then
    sed -i 's/net_output\[0\] = net_output\[0\].masked_fill(~constraint_masks, -math.inf)/net_output[0].masked_fill_(~constraint_masks, -math.inf)/' "$CRIT"
    log "patched $CRIT (in-place constraint mask)"
fi

# --- 2. Python 3.8 venv ------------------------------------------------------------------------
PY38=${OFA_PYTHON:-}
if [ -z "$PY38" ]; then
    if command -v pyenv >/dev/null && [ -x "$(pyenv root)/versions/3.8.18/bin/python3.8" ]; then
        PY38="$(pyenv root)/versions/3.8.18/bin/python3.8"
    elif command -v python3.8 >/dev/null; then PY38=$(command -v python3.8)
    else echo "error: Python 3.8 not found: install it (pyenv install 3.8.18) or set OFA_PYTHON" >&2; exit 2; fi
fi
V=$PEER/venv
if [ ! -f "$V/.ofa-installed" ]; then
    [ -x "$V/bin/python" ] || "$PY38" -m venv "$V"
    "$V/bin/pip" install -q 'pip<24.1' 'setuptools<70' wheel
    # torch 1.8.1: the cp38 manylinux wheel (CUDA 10.2 build; it runs on CPU), kept in wheels/.
    mkdir -p "$PEER/wheels"
    ls "$PEER"/wheels/torch-1.8.1-*.whl >/dev/null 2>&1 \
        || "$V/bin/pip" download --no-deps --only-binary=:all: -d "$PEER/wheels" torch==1.8.1
    # cython<3: the fork's .pyx files; datasets<3: OFA's gigaword task imports datasets.load_metric.
    cat > "$PEER/constraints.txt" <<'C'
torch==1.8.1
torchvision==0.9.1
torchaudio==0.8.1
numpy==1.23.5
Pillow==10.4.0
omegaconf==2.0.6
hydra-core==1.0.7
timm==0.4.12
cython<3
datasets<3
C
    "$V/bin/pip" install --no-deps "$PEER"/wheels/torch-1.8.1-*.whl
    "$V/bin/pip" install -c "$PEER/constraints.txt" typing_extensions numpy==1.23.5 Pillow==10.4.0 cython
    "$V/bin/pip" install --no-deps torchvision==0.9.1 torchaudio==0.8.1
    "$V/bin/pip" install -c "$PEER/constraints.txt" omegaconf==2.0.6 hydra-core==1.0.7 timm==0.4.12
    # The rest of OFA's requirements.txt, except the fork itself (installed below) and the pin
    # pycocotools==2.0.4: its sdist does not compile with Cython 3, caption / SNLI-VE evaluation do
    # not use it, and pycocoevalcap then takes a prebuilt pycocotools wheel.
    grep -v -e '^-e' -e '^pycocotools' "$PEER/src/requirements.txt" > "$PEER/requirements-rest.txt"
    "$V/bin/pip" install -c "$PEER/constraints.txt" -r "$PEER/requirements-rest.txt"
    # The fork's own build needs numpy/cython/torch from this venv, not an isolated build env.
    (cd "$PEER/src" && "$V/bin/pip" install --no-build-isolation -c "$PEER/constraints.txt" -e ./fairseq)
    # OFA's speech data module builds g2p_en's G2p() at import time (every task is imported), which
    # needs NLTK's CMU pronouncing dictionary; NLTK downloads it from the internet, unreachable here.
    # A one-entry stand-in lets the import succeed: caption and SNLI-VE never call G2p. The harness
    # sets NLTK_DATA to this folder when it runs OFA.
    mkdir -p "$PEER/nltk_data/corpora/cmudict"
    echo "a 1 AH0" > "$PEER/nltk_data/corpora/cmudict/cmudict"
    export NLTK_DATA=$PEER/nltk_data
    (cd "$PEER/src" && "$V/bin/python" -c "import torch, fairseq, ofa_module; print('torch', torch.__version__, 'fairseq', fairseq.__file__)")
    touch "$V/.ofa-installed"
fi
log "ready: venv $V, source $PEER/src"
