"""Tests of the VQAv2 and RefCOCO converters (data_utils.convert_vqa, data_utils.convert_refcoco)."""

import base64
import io
import json
import os
import pickle
import re

import pytest
from PIL import Image

from data_utils.conversion import BadRowError
from data_utils.convert_refcoco import cli_main as refcoco_cli, convert_refcoco
from data_utils.convert_vqa import answer_confidences, cli_main as vqa_cli, convert_vqa, normalize_answer
from mue_fairseq.data.location_tokens import parse_box


def _read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _save_png(path, size, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")


def _decode(b64):
    """Decode an image cell the way OFA does (urlsafe decoder on standard base64)."""
    return Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))


# ----------------------------------------------------------------------------- VQAv2


def test_answer_confidences_are_vqa_official_accuracy():
    # leave-one-out mean of min(1, matches/3) over 10 answers: 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 -> 1.0
    assert answer_confidences(["a"] + ["b"] * 2 + ["c"] * 3 + ["d"] * 4) == {"a": 0.3, "b": 0.6, "c": 0.9, "d": 1.0}
    # with fewer human answers the same rule holds: 3 answers, one of them once -> mean(0, 1/3, 1/3)
    assert answer_confidences(["x", "y", "y"]) == {"x": 0.2222, "y": 0.4444}


def test_normalize_answer_as_vqa_evaluation():
    assert [normalize_answer(a) for a in ("Red.", "Two", "the T-shirt", "1,000", "3.5", "yes/no", "Hello!!", "A")] == [
        "red", "2", "t shirt", "1000", "3.5", "yes no", "hello", ""
    ]


def _vqa_fixture(tmp_path):
    images = tmp_path / "train2014"
    _save_png(str(images / "COCO_train2014_000000000001.png"), (8, 6), (255, 0, 0))
    _save_png(str(images / "COCO_train2014_000000000002.png"), (5, 7), (0, 0, 255))

    def answers(*texts):
        return [{"answer": t, "answer_confidence": "yes", "answer_id": k + 1} for k, t in enumerate(texts)]

    questions = {"data_subtype": "train2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "What color\tis it?"},
        {"question_id": 11, "image_id": 2, "question": "Is it blue?"},
        {"question_id": 12, "image_id": 3, "question": "Where is it?"},  # questions[2]: missing image
        {"question_id": 13, "image_id": 1, "question": "How many?"},  # empty answers
        {"image_id": 1, "question": "No id?"},  # questions[4]: missing field
        {"question_id": 15, "image_id": 2, "question": "Unannotated?"},  # no annotation
        {"question_id": 16, "image_id": 2, "question": "What shape?"},
    ]}
    annotations = {"annotations": [
        {"question_id": 10, "answers": answers(*(["Red"] * 7 + ["red."] + ["pink"] * 2))},
        {"question_id": 11, "answers": answers(*(["yes"] * 9 + ["no"]))},
        {"question_id": 12, "answers": answers(*(["left"] * 10))},
        {"question_id": 13, "answers": answers("", " ", "a")},
        {"question_id": 16, "answers": answers(*(["square"] * 3 + ["box"] * 3 + ["cube", "Cube", "a cube.", "the cube"]))},
    ]}
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps(questions))
    a_path.write_text(json.dumps(annotations))
    return str(q_path), str(a_path), str(images)


def test_convert_vqa_skip_mode_writes_ofa_rows_ans2label_and_report(tmp_path):
    q_path, a_path, images = _vqa_fixture(tmp_path)
    out = tmp_path / "out"
    ans2label = tmp_path / "ans2label.pkl"
    report = convert_vqa(q_path, a_path, images, str(out), split="val", on_bad_row="skip",
                         image_pattern="COCO_{subtype}_{image_id:012d}.png", ans2label_path=str(ans2label),
                         num_answers=4)
    rows = _read_tsv(out / "vqa_val.tsv")
    # red: 8 of 10 (Red, red.) -> 1.0; pink: 2 -> 0.6; box and square 3 each -> 0.9, cube 4 -> 1.0
    assert [r[:5] for r in rows] == [
        ["10", "1", "What color is it?", "1.0|!+red&&0.6|!+pink", ""],
        ["11", "2", "Is it blue?", "1.0|!+yes&&0.3|!+no", ""],
        ["16", "2", "What shape?", "1.0|!+cube&&0.9|!+box&&0.9|!+square", ""],
    ]
    with open(os.path.join(images, "COCO_train2014_000000000002.png"), "rb") as f:
        assert base64.b64decode(rows[1][5]) == f.read()
    assert _decode(rows[0][5]).size == (8, 6)

    bad = [(b.source, b.location, b.reason.split(":")[0]) for b in report.bad_rows]
    assert bad == [
        (q_path, "question_id 12", "missing image"),
        (a_path, "question_id 13", "question with no answer"),
        (q_path, "questions[4]", "missing field"),
        (a_path, "question_id 15", "question with no answer"),
    ]
    assert report.rows_written == {"vqa_val.tsv": 3}
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved["num_bad_rows"] == 4 and saved["bad_row_counts"]["question with no answer"] == 2

    # the most frequent human answers of all annotated questions, ties alphabetical
    with open(ans2label, "rb") as f:
        assert pickle.load(f) == {"left": 0, "yes": 1, "red": 2, "cube": 3}


def test_convert_vqa_rows_per_answer_and_fail_mode(tmp_path):
    q_path, a_path, images = _vqa_fixture(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(BadRowError, match=re.escape(q_path) + r":question_id 12: missing image"):
        vqa_cli(["--questions", q_path, "--annotations", a_path, "--image-root", images, "--out-dir", str(out),
                 "--image-pattern", "COCO_{subtype}_{image_id:012d}.png"])
    vqa_cli(["--questions", q_path, "--annotations", a_path, "--image-root", images, "--out-dir", str(out),
             "--image-pattern", "COCO_{subtype}_{image_id:012d}.png", "--on-bad-row", "skip",
             "--rows-per-answer", "--split", "train"])
    rows = _read_tsv(out / "vqa_train.tsv")
    assert [r[:4] for r in rows] == [
        ["10", "1", "What color is it?", "1.0|!+red"],
        ["10", "1", "What color is it?", "0.6|!+pink"],
        ["11", "2", "Is it blue?", "1.0|!+yes"],
        ["11", "2", "Is it blue?", "0.3|!+no"],
        ["16", "2", "What shape?", "1.0|!+cube"],
        ["16", "2", "What shape?", "0.9|!+box"],
        ["16", "2", "What shape?", "0.9|!+square"],
    ]


def test_convert_vqa_without_annotations_writes_placeholder_answers(tmp_path):
    q_path, a_path, images = _vqa_fixture(tmp_path)
    out = tmp_path / "out"
    report = vqa_cli(["--questions", q_path, "--image-root", images, "--out-dir", str(out), "--split", "test",
                      "--image-pattern", "COCO_{subtype}_{image_id:012d}.png", "--on-bad-row", "skip"])
    rows = _read_tsv(out / "vqa_test.tsv")
    assert [r[0] for r in rows] == ["10", "11", "13", "15", "16"]  # every question with an image
    assert {r[3] for r in rows} == {"1.0|!+no"}
    assert [(b.location, b.reason.split(":")[0]) for b in report.bad_rows] == [
        ("question_id 12", "missing image"), ("questions[4]", "missing field")
    ]
    with pytest.raises(ValueError, match="--ans2label needs --annotations"):
        convert_vqa(q_path, None, images, str(out), ans2label_path=str(tmp_path / "a.pkl"))


def test_convert_vqa_rejects_malformed_inputs(tmp_path):
    q_path, a_path, images = _vqa_fixture(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(broken)) + ": not valid JSON"):
        convert_vqa(q_path, str(broken), images, str(tmp_path / "o"))
    no_subtype = tmp_path / "q2.json"
    no_subtype.write_text(json.dumps({"questions": []}))
    with pytest.raises(ValueError, match="data_subtype"):
        convert_vqa(str(no_subtype), a_path, images, str(tmp_path / "o"))


# ----------------------------------------------------------------------------- RefCOCO


def _refcoco_fixture(tmp_path):
    images = tmp_path / "train2014"
    _save_png(str(images / "COCO_train2014_000000000001.png"), (40, 30), (255, 0, 0))
    _save_png(str(images / "COCO_train2014_000000000002.png"), (20, 50), (0, 255, 0))
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "COCO_train2014_000000000002.png", "width": 20, "height": 50},
            {"id": 3, "file_name": "COCO_train2014_000000000003.png", "width": 9, "height": 9},  # no file
        ],
        "annotations": [
            {"id": 100, "image_id": 1, "bbox": [2.5, 3.25, 10.0, 12.5], "category_id": 1},
            {"id": 101, "image_id": 1, "bbox": [30.0, 0.0, 10.5, 30.0], "category_id": 1},  # 0.5 px over: clipped
            {"id": 200, "image_id": 2, "bbox": [0.0, 40.0, 20.0, 15.0], "category_id": 2},  # 5 px below
            {"id": 201, "image_id": 2, "bbox": [1.0, 1.0, 3.0, 4.0], "category_id": 2},
            {"id": 300, "image_id": 3, "bbox": [1.0, 1.0, 2.0, 2.0], "category_id": 2},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }

    def ref(ref_id, ann_id, image_id, split, *sents):
        return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                "sentences": [{"sent_id": sid, "sent": s, "raw": s, "tokens": s.split()} for sid, s in sents]}

    refs = [
        ref(0, 100, 1, "train", (1000, "left  red thing"), (1001, "the red one")),
        ref(1, 101, 1, "testA", (1010, "right edge")),
        ref(2, 200, 2, "train", (1020, "bottom")),  # box outside the image
        ref(3, 201, 2, "val", (1030, "top left"), (1031, "")),  # one empty sentence
        ref(4, 300, 3, "train", (1040, "nothing")),  # missing image file
        ref(5, 201, 2, "test", (1050, "odd split")),  # refcoco has no 'test'
        ref(6, 999, 2, "train", (1060, "no annotation")),
    ]
    refs_path = tmp_path / "refs(unc).p"
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances_path = tmp_path / "instances.json"
    instances_path.write_text(json.dumps(instances))
    return str(refs_path), str(instances_path), str(images)


def test_convert_refcoco_skip_mode_writes_one_row_per_sentence_and_reports(tmp_path):
    refs, instances, images = _refcoco_fixture(tmp_path)
    out = tmp_path / "out"
    report = convert_refcoco(refs, instances, images, str(out), dataset="refcoco", on_bad_row="skip")
    train = _read_tsv(out / "refcoco_train.tsv")
    assert [r[:4] for r in train] == [
        ["1000", "1", "left red thing", "2.5,3.25,12.5,15.75"],
        ["1001", "1", "the red one", "2.5,3.25,12.5,15.75"],
    ]
    with open(os.path.join(images, "COCO_train2014_000000000001.png"), "rb") as f:
        assert base64.b64decode(train[0][4]) == f.read()
    assert [r[:4] for r in _read_tsv(out / "refcoco_testA.tsv")] == [["1010", "1", "right edge", "30.0,0.0,40.0,30.0"]]
    val = _read_tsv(out / "refcoco_val.tsv")
    assert [r[:4] for r in val] == [["1030", "2", "top left", "1.0,1.0,4.0,5.0"]]
    assert _decode(val[0][4]).size == (20, 50)
    assert parse_box(val[0][3], "val") == [1.0, 1.0, 4.0, 5.0]  # readable by the refcoco dataset
    assert _read_tsv(out / "refcoco_testB.tsv") == []

    bad = [(b.source, b.location, b.reason.split(":")[0]) for b in report.bad_rows]
    assert bad == [
        (refs, "ref_id 2 (ann_id 200)", "box outside the image"),
        (refs, "ref_id 3.sentences[1]", "missing field"),
        (refs, "ref_id 4", "missing image"),
        (refs, "ref_id 5", "unknown split"),
        (refs, "ref_id 6", "missing annotation"),
    ]
    assert "0.0,40.0,20.0,55.0 in a 20x50 image" in report.bad_rows[0].reason
    assert report.rows_written == {"refcoco_train.tsv": 2, "refcoco_testA.tsv": 1, "refcoco_val.tsv": 1}
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved["num_bad_rows"] == 5 and saved["bad_rows"][0]["source"] == refs


def test_convert_refcocog_splits_and_fail_mode(tmp_path):
    refs, instances, images = _refcoco_fixture(tmp_path)
    with pytest.raises(BadRowError, match=re.escape(refs) + r":ref_id 2 \(ann_id 200\): box outside the image"):
        refcoco_cli(["--refs", refs, "--instances", instances, "--image-root", images, "--out-dir", str(tmp_path / "o")])
    out = tmp_path / "g"
    # refcocog (umd) has a 'test' split and no testA: ref 1 is now the unknown split, ref 5 is converted
    report = refcoco_cli(["--dataset", "refcocog", "--refs", refs, "--instances", instances, "--image-root", images,
                          "--out-dir", str(out), "--splits", "test", "--on-bad-row", "skip"])
    assert [r[:4] for r in _read_tsv(out / "refcocog_test.tsv")] == [["1050", "2", "odd split", "1.0,1.0,4.0,5.0"]]
    assert not (out / "refcocog_train.tsv").exists()
    assert [(b.location, b.reason.split(":")[0]) for b in report.bad_rows] == [("ref_id 1", "unknown split")]
    with pytest.raises(ValueError, match="unknown splits \\['testA'\\] for refcocog"):
        convert_refcoco(refs, instances, images, str(out), dataset="refcocog", splits=("testA",))
