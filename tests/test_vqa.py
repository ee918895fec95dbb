"""Task `vqa_gen`: OFA-format rows, candidates and trie, VQA score, bad input, and a tiny model
trained, validated and evaluated (allcand and beam search) through the CLIs."""
import json
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ofa_fixtures import BPE_DIR, require_file
from ofa_tsv_rows import png_base64, write_tsv
from tiny_checkpoint import tiny_checkpoint

import mue_fairseq  # noqa: F401
from mue_fairseq.data.vqa_gen_dataset import parse_answers, pre_question
from mue_fairseq.tasks.vqa_gen import VqaGenConfig, VqaGenTask, vqa_scores

CANDIDATES = {"blue": 0, "red": 1, "green": 2, "light blue": 3}


def make_task(**overrides) -> VqaGenTask:
    require_file(BPE_DIR)
    options = {"ans2label_dict": json.dumps(CANDIDATES), "selected_cols": "0,5,2,3,4", **overrides}
    return VqaGenTask.setup_task(OmegaConf.structured(VqaGenConfig(bpe_dir=str(BPE_DIR), **options)))


def vqa_row(qid, question="What color is the star", answers="0.6|!+red&&1.0|!+blue&&0.3|!+green",
            objects="star&&circle"):
    image = png_base64(np.full((12, 16, 3), (30, 90, 220), dtype=np.uint8))
    return [str(qid), "img", question, answers, objects, image]


def load_rows(task, tmp_path, rows):
    task.cfg.data = str(write_tsv(tmp_path / "vqa.tsv", rows))
    task.load_dataset("valid")
    return task.datasets["valid"]


def encode(task, text):
    return task.tgt_dict.encode_line(task.bpe.encode(text), add_if_not_exist=False, append_eos=False).tolist()


# --------------------------------------------------------------------------- text and answers
def test_question_cleaning_and_answers_column():
    assert pre_question("  What-colour is the STAR", 10) == "what colour is the star?"
    assert pre_question("how many?", 10) == "how many?"
    assert pre_question("a b c d e", 3) == "a b c?"
    assert parse_answers("0.6|!+red&&1.0|!+blue", "row 1") == {"red": 0.6, "blue": 1.0}
    assert vqa_scores([{"red": 0.6, "blue": 1.0}] * 3, ["red", "blue", "pink"]) == [0.6, 1.0, 0.0]


@pytest.mark.parametrize("prompt_type", ["none", "prev_output", "src"])
def test_row_tokens(tmp_path, prompt_type):
    task = make_task(prompt_type=prompt_type, add_object=True)
    item = load_rows(task, tmp_path, [vqa_row(7)])[0]
    bos, eos, pad = task.tgt_dict.bos(), task.tgt_dict.eos(), task.tgt_dict.pad()
    question = encode(task, " what color is the star?") + encode(task, " object: star circle")
    answer = encode(task, " blue")  # the answer of highest confidence
    assert item["source"].tolist() == [bos] + question + [eos]
    prompt = {"none": [bos], "prev_output": [bos] + question, "src": [bos] + question + [eos]}[prompt_type]
    assert item["decoder_prompt"].tolist() == prompt
    assert item["prev_output_tokens"].tolist() == prompt + answer
    assert item["target"].tolist() == [pad] * (len(prompt) - 1) + answer + [eos]
    assert item["conf"].tolist() == [1.0] and item["ref_dict"] == {"red": 0.6, "blue": 1.0, "green": 0.3}
    # The trie mask at the first answer position allows the first token of every candidate.
    mask = item["constraint_mask"]
    first = sorted({encode(task, " " + a)[0] for a in CANDIDATES})
    assert mask[len(prompt) - 1].nonzero().squeeze(1).tolist() == first
    assert mask[-1].nonzero().squeeze(1).tolist() == [eos]
    assert not mask[: len(prompt) - 1].any()
    batch = task.datasets["valid"].collater([item])
    assert batch["prefix_tokens"].tolist() == [prompt[1:]]
    assert batch["conf"].tolist() == [1.0]


def test_rows_of_answers_in_both_modes(tmp_path):
    task = make_task(prompt_type="prev_output")
    dataset = load_rows(task, tmp_path, [vqa_row(3), vqa_row(4, answers="1.0|!+light blue")])
    batch = dataset.collater([dataset[0], dataset[1]])
    rows, scores = task.evaluation_rows(batch, ["red", "light blue"])
    assert rows == [{"question_id": 3, "answer": "red"}, {"question_id": 4, "answer": "light blue"}]
    assert scores == [0.6, 1.0]
    task.cfg.val_inference_type = "beamsearch"
    hypos = [[{"tokens": torch.cat([batch["prefix_tokens"][i][batch["prefix_tokens"][i].ne(1)],
                                    torch.tensor(encode(task, " green") + [2])])}] for i in range(2)]
    rows, scores = task.evaluation_rows(batch, hypos)
    assert [r["answer"] for r in rows] == ["green", "green"] and scores == [0.3, 0.0]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("answers, message", [
    ("blue", "answer entry 'blue' is not 'confidence|!\\+answer'"),
    ("high|!+blue", "answer entry 'high|!\\+blue'"),
    ("1.0|!+", "answer entry '1.0|!\\+'"),
    ("", "answer entry ''"),
])
def test_malformed_answers_name_the_row(tmp_path, answers, message):
    dataset = load_rows(make_task(), tmp_path, [vqa_row(1), vqa_row(42, answers=answers)])
    dataset[0]
    with pytest.raises(ValueError, match=rf"row 42 \(.*vqa.tsv, line 2\): {message}"):
        dataset[1]


def test_answer_outside_the_candidates_names_the_row(tmp_path):
    dataset = load_rows(make_task(), tmp_path, [vqa_row(5, answers="1.0|!+purple&&0.3|!+red")])
    with pytest.raises(ValueError, match=r"row 5 .*answer 'purple' .* not a candidate answer.*--unconstrained-training"):
        dataset[0]
    # Open-ended training has no candidates: the same row is a sample.
    open_task = make_task(unconstrained_training=True, val_inference_type="beamsearch")
    item = load_rows(open_task, tmp_path, [vqa_row(5, answers="1.0|!+purple&&0.3|!+red")])[0]
    assert "constraint_mask" not in item and item["target"].tolist()[:-1] == encode(open_task, " purple")


@pytest.mark.parametrize("name, content, message", [
    ("a.pkl", b"not a pickle", "is not a readable pickle"),
    ("a.json", b"{oops", "is not valid JSON"),
    ("a.json", b'["yes", "no"]', "expected a non-empty answer -> label mapping"),
    ("a.pkl", pickle.dumps({1: 0, "yes": 1}), "answers must be non-empty strings; found 1"),
    ("a.txt", b"yes 0", "expected a .json, .pkl or .pickle file"),
])
def test_malformed_ans2label_file_is_named(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"--ans2label-file {path}.*{message}|{message}"):
        make_task(ans2label_file=str(path))


def test_inconsistent_options_are_refused():
    with pytest.raises(ValueError, match="--unconstrained-training has no candidate answers"):
        make_task(unconstrained_training=True)
    with pytest.raises(ValueError, match="--val-inference-type must be allcand or beamsearch"):
        make_task(val_inference_type="greedy")
    with pytest.raises(ValueError, match="--prompt-type must be one of"):
        make_task(prompt_type="question")


# --------------------------------------------------------------------------- tiny model, CLIs
@pytest.fixture(scope="module")
def vqa_checkpoint(tmp_path_factory):
    return tiny_checkpoint("vqa_gen", tmp_path_factory, extra_args=[
        "--best-checkpoint-metric", "vqa_score", "--maximize-best-checkpoint-metric", "--validate-interval", "100",
        "--mue-decoder-threshold", "0.5",
    ])


def candidates_of(checkpoint):
    return json.loads((checkpoint.data_dir / "vqa_ans2label.json").read_text())


def test_fairseq_train_validates_and_evaluate_allcand_agrees(vqa_checkpoint, tmp_path):
    from mue_fairseq.cli.evaluate import cli_main

    state = torch.load(vqa_checkpoint.checkpoint, weights_only=False)
    validation_score = state["extra_state"]["best"]  # vqa_score (full depth) of the validation at the end
    result = cli_main(vqa_checkpoint.eval_args() + ["--results-path", str(tmp_path / "allcand"), "--no-plots",
                                                    "--mue-decoder-threshold", "1.0"])
    assert result.num_samples == 12
    assert result.scores["accuracy"] == pytest.approx(100 * validation_score, abs=0.005)  # logged to 4 digits
    predictions = json.loads((tmp_path / "allcand" / "valid_predict.json").read_text())
    assert [p["question_id"] for p in predictions] == list(range(8, 20))
    assert {p["answer"] for p in predictions} <= set(candidates_of(vqa_checkpoint))
    exits = json.loads((tmp_path / "allcand" / "valid_exit_stats.json").read_text())
    # allcand: one decoder depth per question (its candidates stop together)
    assert all(len(s["decoder_layers"]) == 1 for s in exits["samples"])


def test_evaluate_beam_search_stays_in_the_candidates(vqa_checkpoint, tmp_path):
    from mue_fairseq.cli.evaluate import cli_main

    # Batches of 4 questions whose prompts differ in length: rows finish at different steps, and
    # the trie must follow each row's own prompt through fairseq's reordering.
    result = cli_main(vqa_checkpoint.eval_args() + [
        "--results-path", str(tmp_path / "beam"), "--no-plots", "--beam-search-vqa-eval", "--beam", "5",
        "--unnormalized", "--temperature", "1.0", "--mue-decoder-threshold", "0.5"])
    assert result.num_samples == 12
    predictions = json.loads((tmp_path / "beam" / "valid_predict.json").read_text())
    assert {p["answer"] for p in predictions} <= set(candidates_of(vqa_checkpoint))
    meta = [json.loads(line) for line in (vqa_checkpoint.data_dir / "vqa_gen_valid.meta.jsonl").open()]
    expected = 100 * np.mean([p["answer"] == m["answer"] for p, m in zip(predictions, meta)])
    assert result.scores["accuracy"] == pytest.approx(expected)
    exits = json.loads((tmp_path / "beam" / "valid_exit_stats.json").read_text())
    assert all(len(s["decoder_layers"]) >= 2 for s in exits["samples"])  # answer tokens and eos


def test_synthetic_vqa_answers_follow_the_scenes(tmp_path):
    from data_utils.synthetic_vqa_grounding import VQA_ANSWERS, VQA_SELECTED_COLS, build_vqa_grounding_task

    paths = build_vqa_grounding_task(str(tmp_path), seed=2, num_train=1, num_valid=20, num_test=1)
    assert pickle.load(open(paths["vqa_ans2label"], "rb")) == {a: i for i, a in enumerate(VQA_ANSWERS)}
    meta = [json.loads(line) for line in open(paths["vqa_gen_valid_meta"])]
    rows = [line.split("\t") for line in open(paths["vqa_gen_valid"]).read().splitlines()]
    assert len(rows) == 40 and {m["level"] for m in meta} == {1, 2, 3}
    for row, info in zip(rows, meta):
        question, answers, objects = row[2], row[3], [o.split() for o in info["objects"]]
        assert answers == f"1.0|!+{info['answer']}" and info["answer"] in VQA_ANSWERS
        assert row[4] == "&&".join(o[2] for o in objects)
        if question == "how many shapes are there?":
            assert info["answer"] == str(len(objects))
        elif question.startswith("how many "):
            assert info["answer"] == str(sum(o[1] == question.split()[2] for o in objects))
        elif question.startswith("what color is the "):
            shape = question[len("what color is the "):-1]
            assert info["answer"] == next(o[1] for o in objects if o[2] == shape)
        else:
            color, shape = question.rstrip("?").split()[-2:]
            assert info["answer"] == ("yes" if [color, shape] in [o[1:3] for o in objects] else "no")
    # The rows load as OFA's vqa_gen reads them, every answer a candidate.
    task = make_task(ans2label_file=paths["vqa_ans2label"], selected_cols=VQA_SELECTED_COLS)
    task.cfg.data = paths["vqa_gen_valid"]
    task.load_dataset("valid")
    assert all(task.datasets["valid"][i]["conf"].item() == 1.0 for i in range(len(rows)))


def test_synthetic_relation_questions_follow_the_grid_cells(tmp_path):
    from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

    paths = build_vqa_grounding_task(str(tmp_path), seed=4, num_train=1, num_valid=40, num_test=1, vqa_levels=(4,))
    meta = [json.loads(line) for line in open(paths["vqa_gen_valid_meta"])]
    rows = [line.split("\t") for line in open(paths["vqa_gen_valid"]).read().splitlines()]
    relations = 0
    for row, info in zip(rows, meta):
        cells = {o.split()[2]: o.split()[3] for o in info["objects"]}  # shape -> "r<row>c<col>"
        if len(cells) < 2:  # no relation in a one-object scene: a level-1 question instead
            assert info["level"] == 1
            continue
        relations += 1
        words = row[2].rstrip("?").split()  # is the A left of / above the B
        first, second = words[2], words[-1]
        (r1, c1), (r2, c2) = [tuple(int(v) for v in cells[s][1:].split("c")) for s in (first, second)]
        if "left" in words:
            assert c1 != c2 and info["answer"] == ("yes" if c1 < c2 else "no")
        else:
            assert words[3] == "above" and r1 != r2 and info["answer"] == ("yes" if r1 < r2 else "no")
    assert relations >= 20 and {m["answer"] for m in meta if m["level"] == 4} == {"yes", "no"}


def test_synthetic_vqa_levels_are_checked(tmp_path):
    from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

    with pytest.raises(ValueError, match="vqa_levels must be levels among"):
        build_vqa_grounding_task(str(tmp_path), num_train=1, num_valid=1, num_test=1, vqa_levels=(1, 5))


def test_beam_search_prediction_exits_judge_the_candidate_answers(vqa_checkpoint, tmp_path, monkeypatch):
    """Entropy over the trie's allowed tokens is at most ln(#answers): with that threshold every
    answer token stops after one layer (over the 59,457-token vocabulary it would not)."""
    import math

    from mue_fairseq.cli.evaluate import cli_main
    from mue_fairseq.models import mue_decoder

    seen = []

    class Recording(mue_decoder.TokenExitDecider):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.allowed)

    monkeypatch.setattr(mue_decoder, "TokenExitDecider", Recording)
    answers = candidates_of(vqa_checkpoint)
    result = cli_main(vqa_checkpoint.eval_args() + [
        "--results-path", str(tmp_path / "beam"), "--no-plots", "--beam-search-vqa-eval", "--beam", "5",
        "--unnormalized", "--temperature", "1.0", "--mue-exit-policy", "entropy",
        "--mue-entropy-threshold", str(math.log(len(answers)) + 1e-3)])
    assert result.num_samples == 12
    assert seen and all(a is not None and a.any(dim=1).all() for a in seen)
    # rows still in their forced prompt may emit anything (their tokens are forced); the others
    # only the trie's continuations
    answering = [a[~a.all(dim=1)] for a in seen]
    assert sum(len(a) for a in answering) > 0
    assert max(int(a.sum(dim=1).max()) for a in answering if len(a)) <= len(answers)
    exits = json.loads((tmp_path / "beam" / "valid_exit_stats.json").read_text())
    assert all(s["decoder_layers"][-2:] == [1, 1] for s in exits["samples"])  # the answer's last token, eos
