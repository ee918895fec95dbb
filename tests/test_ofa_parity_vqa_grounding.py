"""Parity with OFA itself on refcoco and vqa_gen: tiny checkpoints trained by OFA's train.py and what
OFA's evaluate.py produced with them (tools/record_ofa_vqa_grounding.sh; fixtures in
``tests/fixtures/ofa_vqa_grounding/``, see its README). The checkpoints are committed without their
frozen tensors and rebuilt exactly (tools/ofa_harness/interop_checkpoint.py, a digest of every tensor
checked) into a temporary folder. They load strictly; boxes, answers and the score line must be
identical, beam hypotheses token for token with positional scores to 1e-5 (sums to 1e-5 or 1e-6
relative), candidate scores to 1e-5."""
import atexit
import json
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest
import torch

from ofa_fixtures import BPE_DIR, REPO, require_file
from script_modules import load_script

import mue_fairseq  # noqa: F401

FIXTURES = REPO / "tests" / "fixtures" / "ofa_vqa_grounding"
REBUILT_DIR = Path(tempfile.mkdtemp(prefix="ofa_vqa_grounding_"))  # 39 MB per checkpoint, removed at exit
atexit.register(shutil.rmtree, REBUILT_DIR, True)
PLUGIN = str(mue_fairseq.__path__[0])
REFCOCO_GENERATION = ["--beam", "5", "--min-len", "4", "--max-len-a", "0", "--max-len-b", "4",
                      "--no-repeat-ngram-size", "3"]
VQA_BEAM = ["--beam-search-vqa-eval", "--beam", "5", "--unnormalized", "--temperature", "1.0"]


def fixture(name: str):
    require_file(BPE_DIR)
    return require_file(FIXTURES / name)


def _interop_checkpoint():
    return load_script(REPO / "tools" / "ofa_harness" / "interop_checkpoint.py", "ofa_harness_interop_checkpoint")


@lru_cache(maxsize=None)
def checkpoint(task: str) -> str:
    """The checkpoint OFA evaluated, rebuilt from its committed small file (raises if a tensor differs)."""
    out = REBUILT_DIR / f"ofa_tiny_{task}.pt"
    _interop_checkpoint().rebuild(str(fixture(f"ofa_tiny_{task}_small.pt")), str(out))
    return str(out)


def ofa_score(run: str) -> float:
    """OFA's score as a fraction, from its log line ``score_sum: tensor([S]), score_cnt: tensor([N]), score: ...``
    (the printed score is rounded to 4 digits; the sum and count are exact)."""
    match = re.search(r"score_sum: tensor\(\[([0-9.e+-]+)\]\), score_cnt: tensor\(\[([0-9.e+-]+)\]\)",
                      fixture(f"{run}/evaluate.log").read_text())
    assert match, f"no score line in {FIXTURES / run / 'evaluate.log'}"
    return float(match.group(1)) / float(match.group(2))


def ofa_json(run: str, name: str):
    return json.loads(fixture(f"{run}/{name}").read_text())


def eval_argv(task: str, batch_size: int, extra=()):
    if task == "refcoco":
        tsv, overrides = "refcoco_test.tsv", {"selected_cols": "0,4,2,3"}
    else:
        tsv = "vqa_gen_test.tsv"
        overrides = {"selected_cols": "0,5,2,3,4", "ans2label_file": str(fixture("vqa_ans2label.pkl"))}
    overrides["bpe_dir"] = str(BPE_DIR)
    return [str(fixture(tsv)), "--path", checkpoint(task), "--user-dir", PLUGIN, "--task", task,
            "--gen-subset", "test", "--batch-size", str(batch_size), "--cpu", "--num-workers", "0",
            "--log-format", "none", "--model-overrides", repr(overrides), *extra]


def run_cli(argv, results):
    from mue_fairseq.cli.evaluate import cli_main

    result = cli_main(argv + ["--results-path", str(results), "--no-plots"])
    return result, json.loads((results / "test_predict.json").read_text())


def batches(task_name: str, batch_size: int, extra=()):
    """(models, task, cfg, batches of the test split) loaded as the evaluate CLI loads them."""
    from mue_fairseq.cli.evaluate import load_for_evaluation, parse_evaluation_args

    models, task, cfg = load_for_evaluation(parse_evaluation_args(eval_argv(task_name, batch_size, extra)))
    task.load_dataset("test")
    dataset = task.datasets["test"]
    samples = [dataset.collater([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
               for start in range(0, len(dataset), batch_size)]
    return models, task, cfg, samples


def assert_same_hypotheses(ours, recorded, sample_id):
    theirs = recorded[str(sample_id)]
    assert len(ours) == len(theirs), f"sample {sample_id}: {len(ours)} beams, OFA {len(theirs)}"
    for beam, (mine, ofa) in enumerate(zip(ours, theirs)):
        assert mine["tokens"].tolist() == ofa["tokens"], f"sample {sample_id} beam {beam}"
        # 1e-5, or float32 resolution for the unnormalised sums over a long forced prompt (|score| ~ 100)
        assert float(mine["score"]) == pytest.approx(ofa["score"], abs=1e-5, rel=1e-6)
        # each positional score is the step's difference of two running sums (fairseq's beam search), so it
        # carries their float32 rounding: up to an ulp or two of |score| (2^-16 past 128)
        tolerance = max(1e-5, 2 * torch.finfo(torch.float32).eps * abs(ofa["score"]))
        assert mine["positional_scores"].tolist() == pytest.approx(ofa["positional_scores"], abs=tolerance)


# --------------------------------------------------------------------------- refcoco
# The MuE model (same file, loaded as mue_ofa) with every exit off: joint encoder, thresholds at 1.
MUE_EXITS_OFF = ["--mue-encoder-mode", "joint"]


def assert_full_depth(results, layers=2):
    samples = json.loads((results / "test_exit_stats.json").read_text())["samples"]
    assert samples and all(s["text_layers"] == layers and set(s["decoder_layers"]) == {layers} for s in samples)


@pytest.mark.parametrize("batch_size, mue", [(1, False), (4, False), (4, True)])
def test_refcoco_boxes_and_score_match_ofa(tmp_path, batch_size, mue):
    extra = REFCOCO_GENERATION + (MUE_EXITS_OFF if mue else [])
    result, predictions = run_cli(eval_argv("refcoco", batch_size, extra), tmp_path)
    assert predictions == ofa_json("refcoco", "test_predict.json")  # float32 boxes, bit for bit
    assert result.scores["accuracy"] == pytest.approx(100 * ofa_score("refcoco"), abs=1e-9)
    if mue:
        assert_full_depth(tmp_path)


def test_refcoco_beam_hypotheses_match_ofa():
    models, task, cfg, samples = batches("refcoco", 1, REFCOCO_GENERATION)
    recorded = ofa_json("refcoco", "outputs.json")["hypotheses"]
    generator = task.build_generator(models, cfg.generation)
    for sample in samples:
        hypos = task.inference_step(generator, models, sample)
        for sample_id, beams in zip(sample["id"].tolist(), hypos):
            assert_same_hypotheses(beams, recorded, sample_id)
    assert len(recorded) == sum(len(s["id"]) for s in samples)


# --------------------------------------------------------------------------- vqa_gen
@pytest.mark.parametrize("mode", ["allcand", "beam"])
@pytest.mark.parametrize("mue", [False, True])
def test_vqa_answers_and_score_match_ofa(tmp_path, mode, mue):
    extra = (VQA_BEAM if mode == "beam" else []) + (MUE_EXITS_OFF if mue else [])
    result, predictions = run_cli(eval_argv("vqa_gen", 4, extra), tmp_path)
    assert predictions == ofa_json(f"vqa_gen_{mode}", "test_predict.json")
    assert result.scores["accuracy"] == pytest.approx(100 * ofa_score(f"vqa_gen_{mode}"), abs=1e-9)
    if mue:
        assert_full_depth(tmp_path)


def test_vqa_candidate_scores_match_ofa():
    models, task, _, samples = batches("vqa_gen", 4)
    recorded = ofa_json("vqa_gen_allcand", "outputs.json")
    assert [task.index2ans[i] for i in range(len(task.index2ans))] == recorded["candidates"]
    with torch.no_grad():
        for sample in samples:
            scores = task.score_answers(models[0], sample)
            for sample_id, row in zip(sample["id"].tolist(), scores.tolist()):
                assert row == pytest.approx(recorded["candidate_scores"][str(sample_id)], abs=1e-5)


def test_vqa_beam_hypotheses_match_ofa():
    models, task, cfg, samples = batches("vqa_gen", 4, VQA_BEAM)
    recorded = ofa_json("vqa_gen_beam", "outputs.json")["hypotheses"]
    generator = task.build_generator(models, cfg.generation)
    for sample in samples:
        hypos = task.inference_step(generator, models, sample)
        for sample_id, beams in zip(sample["id"].tolist(), hypos):
            assert_same_hypotheses(beams, recorded, sample_id)


# --------------------------------------------------------------------------- validation (fairseq-validate)
@pytest.mark.parametrize("task", ["refcoco", "vqa_gen"])
def test_validation_score_matches_ofa(task):
    """The task's valid_step (what fairseq-train validates with) scores OFA's test rows as OFA's evaluate.py."""
    import ast
    import os
    import subprocess
    import sys

    argv = eval_argv(task, 4)
    overrides = ast.literal_eval(argv[argv.index("--model-overrides") + 1])
    if task == "refcoco":
        overrides.update(eval_acc=True, eval_args=json.dumps(
            {"beam": 5, "min_len": 4, "max_len_a": 0, "max_len_b": 4, "no_repeat_ngram_size": 3}))
    argv[argv.index("--model-overrides") + 1] = repr(overrides)
    argv[argv.index("--gen-subset")] = "--valid-subset"
    argv[argv.index("--log-format") + 1] = "simple"
    repo = os.path.dirname(PLUGIN)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "fairseq_cli.validate", *argv], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    metric = "score" if task == "refcoco" else "vqa_score"
    match = re.search(rf"valid on 'test' subset .*\| {metric} ([0-9.]+) ", out.stdout + out.stderr)
    assert match, (out.stdout + out.stderr)[-3000:]
    run = "refcoco" if task == "refcoco" else "vqa_gen_allcand"
    assert float(match.group(1)) == round(ofa_score(run), 4)  # fairseq logs it to 4 digits, as OFA
