#!/usr/bin/env bash
# Build the MuE authors' environment (Tangshengku/OFA at a fixed commit: OFA plus their MuE code,
# with its own fairseq fork) apart from ours and OFA's, so benchmarks and fixtures can run their
# evaluate.py. The recipe is OFA's (tools/ofa_harness/setup_ofa_env.sh does the work) plus two
# patches only their code needs (below).
#
#   tools/ofa_harness/setup_authors_env.sh [AUTHORS_GIT_DIR_OR_SOURCE_TREE]
#
# Source (first that is set): the argument, $AUTHORS_SRC, or the mirror at
# /work/.mirror/Tangshengku+OFA/repo. Everything lands under $AUTHORS_PEER_DIR (default
# work_dirs/authors_peer/, gitignored), laid out as setup_ofa_env.sh lays out work_dirs/ofa_peer/.
# The torch 1.8.1 wheel (about 800 MB) is taken from $TORCH_WHEEL_DIR (default: OFA's environment's
# wheels/ folder) when it is there, so it is not downloaded twice. Idempotent.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
AUTHORS_COMMIT=${AUTHORS_COMMIT:-b329878c3e4fcaa05321f31a0125d1d3a9889f8b}
PEER=${AUTHORS_PEER_DIR:-$ROOT/work_dirs/authors_peer}
SRC_IN=${1:-${AUTHORS_SRC:-/work/.mirror/Tangshengku+OFA/repo}}
WHEELS_FROM=${TORCH_WHEEL_DIR:-$ROOT/work_dirs/ofa_peer/wheels}
log() { echo "[setup_authors_env] $*"; }

mkdir -p "$PEER/wheels"
if ! ls "$PEER"/wheels/torch-1.8.1-*.whl >/dev/null 2>&1; then
    for w in "$WHEELS_FROM"/torch-1.8.1-*.whl; do
        # A hard link costs no space; a symbolic link works across file systems.
        [ -f "$w" ] && { ln "$w" "$PEER/wheels/" 2>/dev/null || ln -s "$(readlink -f "$w")" "$PEER/wheels/"; log "torch wheel from $w"; }
    done
fi

# Their requirements.txt drops OFA's g2p_en, yet their tree still imports it (OFA's speech data
# module, imported with every task), so the recipe's final import check would fail. Put it (and its
# dependencies, at the versions OFA's environment resolves) into the venv first; --no-deps keeps the
# recipe's own pins (numpy, nltk) in charge.
V=$PEER/venv
if [ ! -f "$V/.ofa-installed" ]; then
    if [ ! -x "$V/bin/python" ]; then
        PY38=${OFA_PYTHON:-$( (command -v pyenv >/dev/null && ls "$(pyenv root)"/versions/3.8.18/bin/python3.8) 2>/dev/null || command -v python3.8 || true)}
        [ -n "$PY38" ] || { echo "error: Python 3.8 not found: install it (pyenv install 3.8.18) or set OFA_PYTHON" >&2; exit 2; }
        "$PY38" -m venv "$V"
    fi
    "$V/bin/pip" install -q 'pip<24.1' 'setuptools<70' wheel
    "$V/bin/pip" install -q --no-deps g2p_en==2.1.0 distance==0.1.3 inflect==7.4.0 typeguard==4.4.0 more-itertools==10.5.0
fi

# OFA's recipe at the authors' commit: source export, OFA's two patches (the fork's missing C++
# extension, evaluate.py's unconditional .cuda()), the Python 3.8 venv and `pip install -e fairseq`.
OFA_COMMIT=$AUTHORS_COMMIT OFA_PEER_DIR=$PEER bash "$ROOT/tools/ofa_harness/setup_ofa_env.sh" "$SRC_IN"

SRC=$PEER/src
if [ ! -f "$SRC/.authors-patched" ]; then
    PY=$PEER/venv/bin/python
    # Patch A: their image encoder knows resnet50/101/152 only; OFA later added resnet18 (used by
    # OFA-Tiny-shaped checkpoints such as ours). Add it as OFA defines it: the same ResNet class
    # with [2, 2, 2] bottleneck blocks (1024 output channels, so image_proj is unchanged).
    "$PY" - "$SRC/models/ofa/unify_transformer.py" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old_choice = "choices=['resnet50', 'resnet101', 'resnet152']"
old_branch = "        if args.resnet_type == 'resnet101':\n"
if s.count(old_choice) != 1 or s.count(old_branch) != 1:
    sys.exit(f"error: {p}: resnet_type choices / branch not found as expected; cannot add resnet18")
s = s.replace(old_choice, "choices=['resnet18', 'resnet50', 'resnet101', 'resnet152']")
s = s.replace(old_branch,
              "        if args.resnet_type == 'resnet18':\n"
              "            self.embed_images = ResNet([2, 2, 2], norm_layer=norm_layer, drop_path_rate=args.resnet_drop_path_rate)\n"
              "        elif args.resnet_type == 'resnet101':\n")
open(p, "w").write(s)
PY
    # Patch B: for captioning their eval_step returns scores=None, and evaluate.py then calls
    # sum(None) / len(None). Count no scores instead; the captions it writes are unchanged.
    "$PY" - "$SRC/evaluate.py" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
pairs = [("score_sum += sum(scores)\n", "score_sum += sum(scores or [])\n"),
         ("score_cnt += len(scores)\n", "score_cnt += len(scores or [])\n")]
for old, new in pairs:
    if s.count(old) != 1:
        sys.exit(f"error: {p}: '{old.strip()}' not found once; cannot patch the captioning crash")
    s = s.replace(old, new)
open(p, "w").write(s)
PY
    touch "$SRC/.authors-patched"
    log "authors' patches applied (resnet18, sum(None))"
fi
(cd "$SRC" && NLTK_DATA=$PEER/nltk_data "$PEER/venv/bin/python" -c "import ofa_module, models.ofa.unify_transformer" >/dev/null)
log "ready: venv $PEER/venv, source $SRC (commit $AUTHORS_COMMIT)"
