"""OFA's own `evaluate.py` runs on real photographs (`../shared/ofa_cli/`), reproduced through our
command lines: the result files exactly, and every beam hypothesis's tokens and scores.

The fixture's caption run is one where 3-gram blocking changes the output ("DigDigDig" then other
words, against "Dig" ten times without blocking), so it tests OFA's blocking rule end to end.
Scores are compared at 1e-5 (absolute): log-probabilities of about -10 summed over 11 steps and
divided by 11, where float32 rounding of teacher-forced against incremental decoding is about 4e-6
(the fixture's README); token margins are >= 0.0146, so tokens must be equal.
"""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mue_fairseq.exits.config import mue_overrides
from ofa_fixtures import BPE_DIR, REPO, SHARED, require_file

CLI_DIR = SHARED / "ofa_cli"
CAPTION_TSV = CLI_DIR / "caption_test.tsv"
SNLI_TSV = CLI_DIR / "snli_ve_test.tsv"
CAPTION_CKPT = SHARED / "ofa_reference" / "ofa_tiny_holdout.pt"
SNLI_CKPT = SHARED / "ofa_reference" / "ofa_tiny_snli_ve.pt"
SCORE_TOL = 1e-5

# OFA's arguments from ofa_cli/*/command.sh (paths replaced); generation options added per run.
COMMON = ["--batch-size", "4", "--required-batch-size-multiple", "1", "--log-format", "simple",
          "--log-interval", "1", "--seed", "7", "--gen-subset", "test", "--num-workers", "0", "--cpu"]
CAPTION_RUNS = {"caption": ["--no-repeat-ngram-size", "3"], "caption_no_ngram_block": ["--no-repeat-ngram-size", "0"]}


def caption_overrides() -> dict:
    return {"data": str(CAPTION_TSV), "bpe_dir": str(BPE_DIR), "eval_cider": False, "selected_cols": "1,4,2"}


def snli_overrides() -> dict:
    return {"data": str(SNLI_TSV), "bpe_dir": str(BPE_DIR), "selected_cols": "0,2,3,4,5"}


def recorded(run: str, name: str):
    return json.loads(require_file(CLI_DIR / run / name).read_text())


def run_module(module: str, args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------- whole command lines


@pytest.mark.parametrize("run", sorted(CAPTION_RUNS))
def test_evaluate_cli_writes_ofas_caption_predictions(run, tmp_path):
    require_file(CAPTION_CKPT)
    args = [CAPTION_TSV, "--path", CAPTION_CKPT, "--user-dir", REPO / "mue_fairseq", "--task", "caption", *COMMON,
            "--results-path", tmp_path, "--beam", "2", "--max-len-b", "10", *CAPTION_RUNS[run],
            "--model-overrides", repr(caption_overrides())]
    run_module("mue_fairseq.cli.evaluate", args, tmp_path)
    assert json.loads((tmp_path / "test_predict.json").read_text()) == recorded(run, "test_predict.json")


def test_evaluate_cli_writes_ofas_snli_ve_predictions(tmp_path):
    require_file(SNLI_CKPT)
    args = [SNLI_TSV, "--path", SNLI_CKPT, "--user-dir", REPO / "mue_fairseq", "--task", "snli_ve", *COMMON,
            "--results-path", tmp_path, "--model-overrides", repr(snli_overrides())]
    run_module("mue_fairseq.cli.evaluate", args, tmp_path)
    assert json.loads((tmp_path / "test_predict.json").read_text()) == recorded("snli_ve", "test_predict.json")
    scores = json.loads((tmp_path / "test_scores.json").read_text())
    assert scores["accuracy"] == pytest.approx(100.0 * 3 / 9)  # OFA: score_sum 3, score_cnt 9


@pytest.mark.parametrize("run", sorted(CAPTION_RUNS))
def test_fairseq_generate_gives_ofas_caption_hypotheses(run, tmp_path):
    """fairseq's own generate command line: every hypothesis's tokens and score as OFA's generator's.

    fairseq-generate builds the task from the command line, so the task options the checkpoint was
    trained with (image size 320) are given there."""
    require_file(CAPTION_CKPT)
    args = [CAPTION_TSV, "--path", CAPTION_CKPT, "--user-dir", REPO / "mue_fairseq", "--task", "caption", *COMMON,
            "--bpe-dir", BPE_DIR, "--selected-cols", "1,4,2", "--patch-image-size", "320",
            "--beam", "2", "--nbest", "2", "--max-len-b", "10", *CAPTION_RUNS[run],
            "--model-overrides", repr(caption_overrides())]
    out = run_module("fairseq_cli.generate", args, tmp_path).stdout
    rows = recorded(run, "outputs.json")["rows"]
    from fairseq.data import Dictionary

    symbols = Dictionary.load(str(BPE_DIR / "dict.txt"))  # OFA's dictionary starts with these entries
    seen = {}
    for line in out.splitlines():
        if line.startswith("H-"):  # H-<sample id>, score, the hypothesis's symbols (BPE ids), eos left out
            head, score, text = line.split("\t")
            seen.setdefault(head[2:], []).append((float(score), text))
    assert sorted(seen) == sorted(rows)
    for image_id, hypos in seen.items():
        theirs = rows[image_id]["hypotheses"]
        assert len(hypos) == len(theirs)
        for (score, text), ref in zip(hypos, theirs):
            assert text == " ".join(symbols[t] for t in ref["tokens"][:-1]), image_id
            assert abs(score * math.log(2) - ref["score"]) < SCORE_TOL  # fairseq-generate prints base 2


# ----------------------------------------------------------------------------- in-process, every hypothesis


def load_caption(overrides=None):
    from mue_fairseq.ofa.checkpoint import load_ofa_ensemble

    models, _, task = load_ofa_ensemble([str(require_file(CAPTION_CKPT))],
                                        arg_overrides={**caption_overrides(), **(overrides or {})})
    task.load_dataset("test")
    return models[0].eval(), task


def generate_all(model, task, batch_size: int, ngram: int):
    gen_args = argparse.Namespace(beam=2, max_len_a=0, max_len_b=10, min_len=1, lenpen=1.0, unkpen=0.0,
                                  temperature=1.0, unnormalized=False, no_repeat_ngram_size=ngram)
    generator = task.build_generator([model], gen_args)
    itr = task.get_batch_iterator(dataset=task.dataset("test"), max_sentences=batch_size,
                                  num_shards=1, shard_id=0).next_epoch_itr(shuffle=False)
    results = {}
    with torch.no_grad():
        for sample in itr:
            for sample_id, hypos in zip(sample["id"].tolist(), task.inference_step(generator, [model], sample)):
                results[str(sample_id)] = hypos
    return results


def assert_hypotheses_equal(results, run: str):
    rows = recorded(run, "outputs.json")["rows"]
    assert sorted(results) == sorted(rows)
    for image_id, hypos in results.items():
        theirs = rows[image_id]["hypotheses"]
        assert [h["tokens"].tolist() for h in hypos] == [h["tokens"] for h in theirs], image_id
        for ours, ref in zip(hypos, theirs):
            assert abs(float(ours["score"]) - ref["score"]) < SCORE_TOL
            torch.testing.assert_close(ours["positional_scores"], torch.tensor(ref["positional_scores"]),
                                       atol=SCORE_TOL, rtol=0)


@pytest.fixture(scope="module")
def ofa_caption_model():
    torch.set_num_threads(1)
    return load_caption()


@pytest.mark.parametrize("batch_size", [1, 4, 3])
@pytest.mark.parametrize("run", sorted(CAPTION_RUNS))
def test_caption_hypotheses_equal_ofas(ofa_caption_model, run, batch_size):
    model, task = ofa_caption_model
    assert_hypotheses_equal(generate_all(model, task, batch_size, 3 if run == "caption" else 0), run)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_mue_model_with_exits_disabled_blocks_as_ofa(batch_size):
    """The MuE model and its decoding path (joint encoder, every threshold 1) give OFA's hypotheses."""
    model, task = load_caption(mue_overrides(mue_encoder_mode="joint", mue_image_threshold=1.0,
                                             mue_text_threshold=1.0, mue_decoder_threshold=1.0))
    assert type(model).__name__ == "MuEOFAModel"
    assert_hypotheses_equal(generate_all(model, task, batch_size, 3), "caption")


def repeated_trigrams(tokens) -> list:
    grams = [tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2)]
    return [g for g in set(grams) if grams.count(g) > 1]


def test_blocking_holds_with_decoder_exits():
    """With exits on, hypotheses still never repeat a trigram (bos included), and blocking matters:
    the same exits without it do repeat one."""
    overrides = mue_overrides(mue_image_threshold=0.5, mue_text_threshold=0.5, mue_decoder_threshold=0.5)
    model, task = load_caption(overrides)
    blocked = generate_all(model, task, 4, 3)
    free = generate_all(model, task, 4, 0)
    for hypos in blocked.values():
        for hypo in hypos:
            assert "exit_layers" in hypo
            assert repeated_trigrams([task.tgt_dict.bos()] + hypo["tokens"].tolist()) == []
    assert any(repeated_trigrams(h["tokens"].tolist()) for hypos in free.values() for h in hypos)
