"""Tests of mue_fairseq.metrics: CIDEr-D, pycocoevalcap caption scores, SNLI-VE accuracy."""

import json
import math
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mue_fairseq.metrics import caption_scores
from mue_fairseq.metrics.accuracy import (
    cli_main as accuracy_cli,
    load_snli_ve_labels,
    load_snli_ve_predictions,
    normalize_answer,
    snli_ve_accuracy,
)
from mue_fairseq.metrics.caption_scores import (
    load_coco_references,
    load_predictions,
    score_caption_files,
    score_captions,
    spice_jars_missing,
)
from mue_fairseq.metrics.cider import (
    CiderD,
    save_document_frequency,
    simple_tokenize,
)

def require_java() -> None:
    """pycocoevalcap's scorers run Java; a machine without it must fail these tests, not skip them."""
    if shutil.which("java") is None:
        pytest.fail("java not found: pycocoevalcap needs a Java runtime (apt install default-jre-headless)")


needs_java = pytest.mark.usefixtures("java_runtime")


@pytest.fixture
def java_runtime():
    require_java()

# ----------------------------------------------------------------------------- CIDEr-D


def test_simple_tokenize_lowercases_and_splits_punctuation():
    assert simple_tokenize("A Man, riding-a horse.") == ["a", "man", "riding", "a", "horse"]
    assert simple_tokenize("  a red  circle ") == ["a", "red", "circle"]


def test_ciderd_identical_captions_hand_values():
    # Each n-gram occurs in one image only: df = 1, idf = log(2); identical vectors have cosine 1
    # for every order the sentence has, so the score is 10 * (orders present) / 4.
    gts = {"a": ["the red circle is left"], "b": ["blue square"]}
    res = {"a": ["the red circle is left"], "b": ["blue square"]}
    mean, scores = CiderD().compute_score(gts, res)
    assert scores == pytest.approx([10.0, 5.0])
    assert mean == pytest.approx(7.5)


def test_ciderd_ngram_shared_by_all_images_weighs_nothing():
    gts = {1: ["red circle"], 2: ["red circle"]}
    res = {1: ["red circle"], 2: ["red circle"]}
    mean, scores = CiderD().compute_score(gts, res)
    assert mean == 0.0 and list(scores) == [0.0, 0.0]


def test_ciderd_length_penalty_and_clipping_hand_values():
    # image 1: "red" vs "red circle": unigram cosine 1/sqrt(2), length gap 1 -> exp(-1/72).
    # image 2: "blue blue" vs "blue square": the clipped unigram dot is log2^2 (not 2 log2^2),
    # norms 2 log2 and sqrt(2) log2 -> 1/(2 sqrt 2); no shared bigram; equal lengths.
    gts = {1: ["red circle"], 2: ["blue square"]}
    res = {1: ["red"], 2: ["blue blue"]}
    _, scores = CiderD().compute_score(gts, res)
    expected_1 = 10 * (1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    expected_2 = 10 * (1 / (2 * math.sqrt(2))) / 4
    assert scores == pytest.approx([expected_1, expected_2], rel=1e-12)
    # sigma controls the penalty
    _, wide = CiderD(sigma=1e6).compute_score(gts, res)
    assert wide[0] == pytest.approx(10 * (1 / math.sqrt(2)) / 4, rel=1e-9)


def _random_captions(seed: int, n_images: int):
    rng = random.Random(seed)
    words = "a the red blue green circle square star left right of above below small large and".split()
    gts, res = {}, {}
    for i in range(n_images):
        gts[i] = [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 5))]
        res[i] = [" ".join(rng.choices(words, k=rng.randint(1, 10)))]
    return gts, res


def test_ciderd_corpus_mode_equals_pycocoevalcap_cider():
    # pycocoevalcap's Cider is the same formula (clipping and Gaussian penalty included) with
    # document frequencies from the scored references; on pre-tokenized text both must agree.
    from pycocoevalcap.cider.cider import Cider

    gts, res = _random_captions(0, 40)
    ours_mean, ours = CiderD(df="corpus").compute_score(gts, res)
    ref_mean, ref = Cider().compute_score(gts, res)
    assert ours_mean == pytest.approx(ref_mean, rel=1e-12)
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert ours_mean > 0


def test_ciderd_cached_df_json_and_ofa_pickle(tmp_path):
    gts, res = _random_captions(1, 30)
    corpus_mean, corpus_scores = CiderD().compute_score(gts, res)

    json_path = tmp_path / "df.json"
    save_document_frequency(gts, str(json_path))
    mean_json, scores_json = CiderD(df=str(json_path)).compute_score(gts, res)
    assert mean_json == pytest.approx(corpus_mean, rel=1e-12)
    np.testing.assert_allclose(scores_json, corpus_scores, rtol=1e-12)

    # OFA's coco-*-words.p layout: {"document_frequency": defaultdict {ngram tuple: count}, "ref_len": N}
    pkl_path = tmp_path / "words.p"
    save_document_frequency(gts, str(pkl_path))
    with open(pkl_path, "rb") as f:
        payload = pickle.load(f)
    assert payload["ref_len"] == len(gts)  # the number of images; readers take its log
    assert payload["document_frequency"][("no", "such", "ngram")] == 0  # OFA's scorer relies on a defaultdict
    mean_pkl, _ = CiderD(df=str(pkl_path)).compute_score(gts, res)
    assert mean_pkl == pytest.approx(corpus_mean, rel=1e-12)
    mean_mapping, _ = CiderD(df=payload).compute_score(gts, res)
    assert mean_mapping == pytest.approx(corpus_mean, rel=1e-12)

    # Scoring a subset with the cached statistics of the full corpus differs from corpus mode on the subset.
    sub = [0, 1, 2]
    sub_gts, sub_res = {k: gts[k] for k in sub}, {k: res[k] for k in sub}
    cached_sub, cached_sub_scores = CiderD(df=str(json_path)).compute_score(sub_gts, sub_res)
    np.testing.assert_allclose(cached_sub_scores, corpus_scores[:3], rtol=1e-12)
    assert CiderD().compute_score(sub_gts, sub_res)[0] != pytest.approx(cached_sub)


def test_ciderd_rejects_bad_input(tmp_path):
    with pytest.raises(KeyError, match="keys of gts and res differ"):
        CiderD().compute_score({1: ["a b"]}, {2: ["a b"]})
    with pytest.raises(ValueError, match="one hypothesis"):
        CiderD().compute_score({1: ["a b"]}, {1: ["a b", "c d"]})
    with pytest.raises(ValueError, match="non-empty list"):
        CiderD().compute_score({1: []}, {1: ["a b"]})
    with pytest.raises(FileNotFoundError, match="nowhere.p"):
        CiderD(df=str(tmp_path / "nowhere.p"))


# ----------------------------------------------------------------------------- pycocoevalcap scores

REFS = {
    1: ["A red circle on the left.", "a red circle at the left side"],
    2: ["a red square circle"],
    3: ["Two dogs play in the grass.", "two dogs are playing on grass", "dogs playing outside"],
}
PREDS = {1: "a red circle on the left", 2: "a red circle", 3: "a cat sleeps on a sofa"}


def _write_inputs(tmp_path, refs, preds):
    ref_path, pred_path = tmp_path / "refs.json", tmp_path / "preds.json"
    annotations = [{"image_id": k, "id": 10 * k + j, "caption": c} for k, v in refs.items() for j, c in enumerate(v)]
    json.dump({"images": [{"id": k} for k in refs], "annotations": annotations}, open(ref_path, "w"))
    # OFA writes image ids as strings
    json.dump([{"image_id": str(k), "caption": c} for k, c in preds.items()], open(pred_path, "w"))
    return str(ref_path), str(pred_path)


@needs_java
def test_score_caption_files_matches_direct_pycocoevalcap(tmp_path, monkeypatch):
    import pycocoevalcap.meteor.meteor as meteor_module
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # Direct pycocoevalcap calls on independently tokenized text first.
    tok = PTBTokenizer()
    gts = tok.tokenize({str(k): [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tok.tokenize({str(k): [{"caption": c}] for k, c in PREDS.items()})
    assert gts["1"][0] == "a red circle on the left"  # lower-cased, final period removed
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    # METEOR's JVM takes ~15 s to load its paraphrase table: score_captions reuses this process.
    meteor_scorer = meteor_module.Meteor()
    meteor, _ = meteor_scorer.compute_score(gts, res)
    monkeypatch.setattr(meteor_module, "Meteor", lambda: meteor_scorer)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    expected = dict(zip(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"], bleu), METEOR=meteor, ROUGE_L=rouge, CIDEr=cider)

    ref_path, pred_path = _write_inputs(tmp_path, REFS, PREDS)
    out_path = tmp_path / "scores.json"
    scores = score_caption_files(ref_path, pred_path, str(out_path), spice=False)
    assert meteor_scorer.meteor_p.returncode is not None  # the METEOR process was shut down
    assert json.load(open(out_path)) == pytest.approx(scores)
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name

    # Hand-checked ROUGE-L (beta 1.2; best precision and best recall over the references):
    # image 1 equals a reference (1.0); image 2 "a red circle" vs "a red square circle": LCS 3,
    # precision 1, recall 3/4; image 3 shares only "on" with the 6-word "two dogs are playing on
    # grass": precision 1/6, recall 1/6.
    beta2 = 1.2**2

    def rouge_l(p, r):
        return (1 + beta2) * p * r / (r + beta2 * p)

    expected_rouge = (1.0 + rouge_l(1.0, 0.75) + rouge_l(1 / 6, 1 / 6)) / 3
    assert scores["ROUGE_L"] == pytest.approx(expected_rouge, rel=1e-9)
    # Our Java-free CIDEr-D agrees with pycocoevalcap's CIDEr on the PTB-tokenized text.
    assert CiderD().compute_score(gts, res)[0] == pytest.approx(scores["CIDEr"], rel=1e-12)


@needs_java
def test_score_captions_empty_prediction_and_spice_auto(caplog):
    caplog.set_level("INFO", logger="mue_fairseq.metrics.caption_scores")
    preds = {"x": "", "y": "a red circle on the left"}
    refs = {"x": ["a blue square"], "y": ["a red circle on the left"]}
    scores, per_image = score_captions(preds, refs, return_per_image=True, scorers=("Bleu", "ROUGE_L", "CIDEr"))
    assert set(scores) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"}
    assert per_image["ROUGE_L"] == {"x": 0.0, "y": pytest.approx(1.0)}
    assert scores["ROUGE_L"] == pytest.approx(0.5)
    assert per_image["CIDEr"]["x"] == 0.0
    if spice_jars_missing():
        assert "SPICE" not in scores
        skipped = [r for r in caplog.records if "SPICE skipped" in r.getMessage()]
        assert len(skipped) == 1


def test_spice_required_but_missing_raises_without_download(monkeypatch):
    import pycocoevalcap.spice.get_stanford_models as getter

    # as on a machine without the jars, whether or not this one has them
    monkeypatch.setattr(caption_scores, "spice_jars_missing", lambda: ["lib/stanford-corenlp-3.6.0.jar"])

    def no_download(*args, **kwargs):
        raise AssertionError("SPICE download attempted")

    monkeypatch.setattr(getter, "urlretrieve", no_download)
    with pytest.raises(RuntimeError, match="stanford-corenlp-3.6.0.jar"):
        score_captions({1: "a cat"}, {1: ["a cat"]}, spice=True)


def test_score_captions_input_checks():
    with pytest.raises(KeyError, match="no references"):
        score_captions({1: "a", 9: "b"}, {1: ["a"]}, spice=False)
    with pytest.raises(KeyError, match="have no prediction"):
        score_captions({1: "a"}, {1: ["a"], 2: ["b"]}, spice=False)
    with pytest.raises(ValueError, match="two predictions"):
        score_captions({1: "a", "1": "b"}, {1: ["a"]}, spice=False)
    with pytest.raises(ValueError, match="non-empty list"):
        score_captions({1: "a"}, {1: []}, spice=False)


def test_load_prediction_and_reference_files(tmp_path):
    ref_path, pred_path = _write_inputs(tmp_path, REFS, PREDS)
    refs = load_coco_references(ref_path)
    assert refs == {str(k): v for k, v in REFS.items()}
    assert load_predictions(pred_path) == {str(k): v for k, v in PREDS.items()}
    dup = tmp_path / "dup.json"
    json.dump([{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}], open(dup, "w"))
    with pytest.raises(ValueError, match=r"entry \[1\] repeats image_id '1'"):
        load_predictions(str(dup))
    bad = tmp_path / "bad.json"
    json.dump({"annotations": [{"image_id": 1}]}, open(bad, "w"))
    with pytest.raises(ValueError, match=r"annotations\[0\]"):
        load_coco_references(str(bad))


# ----------------------------------------------------------------------------- SNLI-VE accuracy


def test_snli_ve_accuracy_with_answer_words_and_groups():
    labels = {1: "entailment", 2: "contradiction", 3: "neutral", 4: "neutral"}
    preds = {"1": "yes", "2": " No", "3": "yes", "4": "maybe"}
    result = snli_ve_accuracy(preds, labels, groups={1: 1, 2: 1, 3: 2, 4: 2})
    assert result["accuracy"] == 0.75 and result["count"] == 4
    assert result["per_class"] == {"contradiction": 1.0, "entailment": 1.0, "neutral": 0.5}
    assert result["per_group"] == {1: 1.0, 2: 0.5}
    assert normalize_answer("Maybe ") == "neutral"
    with pytest.raises(ValueError, match="unknown SNLI-VE answer"):
        normalize_answer("perhaps")
    with pytest.raises(KeyError, match="missing"):
        snli_ve_accuracy({1: "yes"}, labels)


def test_accuracy_files_and_cli(tmp_path):
    tsv = tmp_path / "snli.tsv"
    tsv.write_text("0\t7\tIMG\thyp a\tprem a\tentailment\n1\t7\tIMG\thyp b\tprem b\tneutral\n")
    preds = tmp_path / "preds.json"
    json.dump([{"uniq_id": 0, "answer": "yes"}, {"uniq_id": 1, "answer": "no"}], open(preds, "w"))
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"uniq_id": 0, "difficulty": 1}\n{"uniq_id": 1, "difficulty": 3}\n')
    assert load_snli_ve_labels(str(tsv)) == {"0": "entailment", "1": "neutral"}
    assert load_snli_ve_predictions(str(preds)) == {"0": "yes", "1": "no"}
    out = tmp_path / "acc.json"
    result = accuracy_cli(["--predictions", str(preds), "--tsv", str(tsv), "--meta", str(meta), "--output", str(out)])
    assert result["accuracy"] == 0.5 and result["per_group"] == {1: 1.0, 3: 0.0}
    assert json.load(open(out))["accuracy"] == 0.5
    bad = tmp_path / "bad.tsv"
    bad.write_text("0\t7\tIMG\n")
    with pytest.raises(ValueError, match="bad.tsv:1: expected 6 columns"):
        load_snli_ve_labels(str(bad))


OFA_CIDER_CASE = Path(__file__).parent / "fixtures" / "ofa_cider_cached.json"


def test_cached_ciderd_equals_ofas_own_scorer(tmp_path):
    """OFA's scorer's numbers (tools/record_ofa_cider.py) from a pickle in OFA's layout: ours reads
    `ref_len` as the image count and takes its log, as OFA's does. Both compute in float64; the
    tolerance covers summation order only."""
    case = json.loads(OFA_CIDER_CASE.read_text())
    pkl_path = tmp_path / "coco-valid-words.p"
    save_document_frequency(case["document_frequency_corpus"], str(pkl_path))
    gts = case["gts"]
    res = {image_id: [hyp] for image_id, hyp in case["hypotheses"].items()}
    mean, scores = CiderD(df=str(pkl_path), tokenize=str.split).compute_score(gts, res)
    np.testing.assert_allclose(scores, case["ofa_cached_scores"], rtol=1e-12)
    assert mean == pytest.approx(case["ofa_cached_mean"], rel=1e-12)
    corpus_mean, corpus_scores = CiderD(tokenize=str.split).compute_score(gts, res)
    np.testing.assert_allclose(corpus_scores, case["ofa_corpus_scores"], rtol=1e-12)
    # Reading ref_len as if it were already a log (the old mistake) gives other numbers.
    with open(pkl_path, "rb") as f:
        payload = pickle.load(f)
    wrong = CiderD(df={**payload, "ref_len": math.exp(payload["ref_len"])}, tokenize=str.split)
    assert abs(wrong.compute_score(gts, res)[0] - case["ofa_cached_mean"]) > 0.1


def test_old_json_and_bad_pickles_are_named(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"n": 4, "ref_len": 2.0, "document_frequency": {"a": 1}}))
    with pytest.raises(ValueError, match="old.json.*earlier mue-fairseq"):
        CiderD(df=str(old))
    bad = tmp_path / "bad.p"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.p"):
        CiderD(df=str(bad))
    layout = tmp_path / "layout.p"
    with open(layout, "wb") as f:
        pickle.dump({"document_frequency": {}}, f)
    with pytest.raises(KeyError, match="layout.p.*ref_len"):
        CiderD(df=str(layout))


def test_cached_pickle_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    """The same corpus must give the same file on every run (set order follows PYTHONHASHSEED)."""
    code = ("import sys; from mue_fairseq.metrics.cider import save_document_frequency; "
            "save_document_frequency({1: ['a red circle and a blue star'], 2: ['two large squares', 'a star']}, "
            "sys.argv[1])")
    outputs = []
    for seed in ("1", "2"):
        path = tmp_path / f"words{seed}.p"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env, cwd=Path(__file__).parents[1])
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
