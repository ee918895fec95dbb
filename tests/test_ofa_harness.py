"""Ours against OFA's own `evaluate.py` as the differential harness recorded it
(`tools/ofa_harness/compare.py`, OFA-Sys/OFA a36b91ce in its own Python 3.8 / torch 1.8.1
environment; fixtures in `tests/fixtures/ofa_harness/`). No OFA environment is needed here.

* `caption_holdout_beam5`: OFA's real caption settings (beam 5, max-len-b 16, 3-gram blocking) at
  batch 16 and 4 on the shared photographs and OFA-trained checkpoint.
* `interop_{ofa,mue_ofa}_caption`: checkpoints that *we* trained with fairseq-train (arch ofa_tiny
  with OFA's loss; mue_ofa_tiny with the layer-wise loss), evaluated by OFA's evaluate.py. They are
  committed small (`interop_*.pt`: what training changed) and rebuilt exactly
  (`tools/ofa_harness/interop_checkpoint.py`; a digest of every tensor says it is the file OFA read).
* `snli_ve_shared`: answer scoring at batch 16 and 4; rows of one batch have different source
  lengths, so padding is exercised.

Tolerances: hypothesis scores (mean log-probability per token) 1e-5 absolute; positional scores,
log-softmax values of up to ~11 in magnitude from a 59,457-way softmax computed by another torch
with another summation order, 32 float32 ulps of their magnitude (3.8e-5 at 10). Tokens, answers and
result files exactly: the recorded top-2 gaps are >= 8.6e-4, far above float32 noise.
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ofa_fixtures import BPE_DIR, REPO, SHARED, require_file
from script_modules import load_script

FIXTURES = REPO / "tests" / "fixtures" / "ofa_harness"
HARNESS = REPO / "tools" / "ofa_harness"
SCORE_TOL = 1e-5
ULP32 = torch.finfo(torch.float32).eps
REBUILT_DIR = Path(tempfile.mkdtemp(prefix="ofa_harness_"))  # 40 MB per checkpoint, removed at exit
atexit.register(shutil.rmtree, REBUILT_DIR, True)


def harness(name: str):
    return load_script(HARNESS / f"{name}.py", f"ofa_harness_{name}")


compare = harness("compare")
interop = harness("interop_checkpoint")


def recorded(name: str) -> dict:
    return json.loads(require_file(FIXTURES / f"{name}.json").read_text())


@lru_cache(maxsize=None)
def rebuilt(variant: str) -> str:
    """The interop checkpoint OFA evaluated, rebuilt from its committed small file."""
    out = REBUILT_DIR / f"interop_{variant}.pt"
    interop.rebuild(str(require_file(FIXTURES / f"interop_{variant}.pt")), str(out))
    return str(out)


# case -> (checkpoint, TSV, our overrides). The MuE checkpoint runs with OFA's joint encoder (every
# exit off by default): the same computation as OFA's, which knows no MuE.
CASES = {
    "caption_holdout_beam5": (lambda: str(require_file(SHARED / "ofa_reference" / "ofa_tiny_holdout.pt")),
                              lambda: require_file(SHARED / "ofa_cli" / "caption_test.tsv"), {}),
    "interop_ofa_caption": (lambda: rebuilt("ofa"), lambda: require_file(FIXTURES / "interop_caption_test.tsv"), {}),
    "interop_mue_ofa_caption": (lambda: rebuilt("mue_ofa"), lambda: require_file(FIXTURES / "interop_caption_test.tsv"),
                                {"mue_encoder_mode": "joint"}),
}


@lru_cache(maxsize=None)
def ours(case: str):
    checkpoint, tsv, overrides = CASES[case]
    fixture = recorded(case)
    return compare.load_ours(checkpoint(), tsv(), fixture["task"], BPE_DIR, fixture["selected_cols"], overrides)


def caption_runs():
    return [(case, i) for case in CASES for i in range(2)]


@pytest.mark.parametrize("case,run", caption_runs())
def test_caption_hypotheses_equal_ofas(case, run):
    torch.set_num_threads(1)
    fixture = recorded(case)
    theirs = fixture["ofa"][run]
    model, task = ours(case)
    gen = fixture["generation"]
    assert gen == {"beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}  # OFA's evaluate_caption.sh
    hypos = compare.our_hypotheses(model, task, theirs["batch_size"], gen["beam"], gen["max_len_b"],
                                   gen["no_repeat_ngram_size"])
    result = compare.compare_hypotheses(theirs["hypotheses"], hypos)
    assert result["tokens_equal"] == result["samples"] == len(theirs["predictions"]), result["differing"]
    assert result["max_abs_score_diff"] < SCORE_TOL
    for key, their_beams in theirs["hypotheses"].items():
        assert len(their_beams) == gen["beam"]
        for mine, ref in zip(hypos[key], their_beams):
            ref_scores = torch.tensor(ref["positional_scores"], dtype=torch.float64)
            diff = (torch.tensor(mine["positional_scores"], dtype=torch.float64) - ref_scores).abs()
            assert bool((diff <= 32 * ULP32 * ref_scores.abs().clamp(min=1.0)).all()), (key, diff.max())


# One evaluate command line per case (batch 16: one batch of 8 or 12 rows; batch 4: several).
CLI_RUNS = [("caption_holdout_beam5", 0), ("caption_holdout_beam5", 1), ("interop_ofa_caption", 1),
            ("interop_mue_ofa_caption", 0)]


@pytest.mark.parametrize("case,run", CLI_RUNS)
def test_evaluate_cli_writes_ofas_predictions(case, run, tmp_path):
    checkpoint, tsv, overrides = CASES[case]
    fixture = recorded(case)
    theirs = fixture["ofa"][run]
    gen = fixture["generation"]
    model_overrides = {"data": str(tsv()), "bpe_dir": str(BPE_DIR), "eval_cider": False,
                       "selected_cols": fixture["selected_cols"], **overrides}
    args = [tsv(), "--path", checkpoint(), "--user-dir", REPO / "mue_fairseq", "--task", "caption",
            "--batch-size", theirs["batch_size"], "--required-batch-size-multiple", "1", "--gen-subset", "test",
            "--num-workers", "0", "--cpu", "--results-path", tmp_path, "--beam", gen["beam"], "--max-len-b",
            gen["max_len_b"], "--no-repeat-ngram-size", gen["no_repeat_ngram_size"], "--no-plots",
            "--model-overrides", repr(model_overrides)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mue_fairseq.cli.evaluate", *map(str, args)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "test_predict.json").read_text()) == theirs["predictions"]


@pytest.mark.parametrize("run", [0, 1])
def test_snli_ve_answer_scores_equal_ofas_with_padded_rows(run):
    torch.set_num_threads(1)
    fixture = recorded("snli_ve_shared")
    theirs = fixture["ofa"][run]
    model, task = compare.load_ours(require_file(SHARED / "ofa_reference" / "ofa_tiny_snli_ve.pt"),
                                    require_file(SHARED / "ofa_cli" / "snli_ve_test.tsv"), "snli_ve", BPE_DIR,
                                    fixture["selected_cols"])
    lengths = compare.source_lengths(task, theirs["batch_size"])
    assert any(len(set(batch)) > 1 for batch in lengths)  # rows of one batch are padded to the longest
    assert theirs["answer_order"] == ["no", "yes", "maybe"]
    scores = compare.our_answer_scores(model, task, theirs["batch_size"])
    result = compare.compare_answer_scores(theirs["answer_scores"], scores)
    assert result["argmax_equal"] == result["samples"] == 9
    assert result["max_abs_score_diff"] < SCORE_TOL
    predicted = {str(p["uniq_id"]): p["answer"] for p in theirs["predictions"]}
    for key, row in scores.items():
        assert theirs["answer_order"][max(range(3), key=row.__getitem__)] == predicted[key]
    assert theirs["score_line"].endswith("score: 0.3333")  # OFA: 3 of 9 right


@pytest.mark.parametrize("variant", ["ofa", "mue_ofa"])
def test_interop_checkpoints_are_what_ofa_read(variant):
    """The rebuilt file has the recorded weights; the MuE one records OFA's architecture name (OFA's
    code cannot build `mue_ofa*`) together with its MuE options, so ours builds mue_ofa from it."""
    from mue_fairseq.models.mue_ofa import MuEOFAModel

    case = f"interop_{variant}_caption"
    path = rebuilt(variant)
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert interop.weights_digest(state["model"]) == recorded(case)["checkpoint_weights_digest"]
    model_cfg = vars(state["cfg"]["model"]) if not hasattr(state["cfg"]["model"], "items") else state["cfg"]["model"]
    assert model_cfg["arch"] == model_cfg["_name"] == "ofa_tiny"
    criterion = state["optimizer_history"][-1]["criterion_name"]
    model, _ = ours(case)
    if variant == "mue_ofa":
        assert criterion == "LayerwiseCrossEntropyCriterion"
        assert "mue_decoder_threshold" in model_cfg
        assert isinstance(model, MuEOFAModel)
    else:
        assert criterion == "AdjustLabelSmoothedCrossEntropyCriterion"
        assert not isinstance(model, MuEOFAModel)


def test_mue_architectures_record_ofas_name():
    from mue_fairseq.models.mue_ofa import record_ofa_architecture
    from tiny_models import tiny_args

    for mue_arch, ofa_arch in [("mue_ofa_tiny", "ofa_tiny"), ("mue_ofa_base", "ofa_base"), ("mue_ofa", "ofa_large")]:
        args = tiny_args(mue_arch)  # the architecture's defaults applied
        record_ofa_architecture(args)
        assert args.arch == args._name == ofa_arch
