"""Tests of data_utils: COCO and SNLI-VE converters, the built-in synthetic task."""

import base64
import filecmp
import io
import json
import os
import pickle
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from data_utils.conversion import BadRowError
from data_utils.convert_coco import cli_main as coco_cli, convert_coco
from data_utils.convert_snli_ve import convert_snli_ve
from data_utils.synthetic import SyntheticTaskConfig, build_synthetic_task
from data_utils.synthetic.language import HIDDEN_PROPERTIES
from data_utils.synthetic.scene import COLORS
from data_utils.synthetic_task import cli_main as synthetic_cli
from mue_fairseq.metrics.synthetic_content import load_meta
from ofa_fixtures import BPE_DIR, require_file


def _read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _decode(b64):
    """Decode an image cell the way OFA does (urlsafe decoder on standard base64)."""
    return Image.open(io.BytesIO(base64.urlsafe_b64decode(b64)))


def _save_image(path, size=(20, 16), color=(200, 30, 30), fmt="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)


# ----------------------------------------------------------------------------- COCO


def _coco_fixture(tmp_path):
    root = tmp_path / "coco"
    _save_image(str(root / "train2014" / "a.jpg"))
    _save_image(str(root / "val2014" / "b.jpg"), color=(0, 0, 200))
    _save_image(str(root / "val2014" / "c.jpg"), color=(0, 200, 0))
    _save_image(str(root / "val2014" / "d.jpg"))
    (root / "val2014" / "broken.jpg").write_bytes(b"not an image")

    def entry(cocoid, split, filepath, filename, sents, first_sentid):
        return {
            "filepath": filepath, "filename": filename, "cocoid": cocoid, "split": split,
            "sentids": list(range(first_sentid, first_sentid + len(sents))),
            "sentences": [{"raw": s} for s in sents],
        }

    images = [
        entry(1, "train", "train2014", "a.jpg", ["A dog\truns.", "A dog is running."], 100),
        entry(2, "restval", "val2014", "b.jpg", ["Blue picture.", "bad && caption"], 200),  # 1 bad sentence
        entry(3, "val", "val2014", "c.jpg", ["A green image.", "Green.", "All green"], 300),
        entry(4, "test", "val2014", "d.jpg", ["A red image."], 400),
        entry(5, "test", "val2014", "missing.jpg", ["Nothing here."], 500),  # images[4]: missing image
        {"filename": "x.jpg", "cocoid": 6, "split": "test", "sentences": [{"raw": "x"}]},  # no filepath
        entry(7, "val", "val2014", "broken.jpg", ["Broken."], 700),  # images[6]: unreadable
        entry(8, "weird", "val2014", "d.jpg", ["Odd split."], 800),  # images[7]: unknown split
    ]
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return str(karpathy), str(root)


def test_convert_coco_skip_mode_writes_ofa_tsvs_and_reports(tmp_path):
    karpathy, root = _coco_fixture(tmp_path)
    out = tmp_path / "out"
    report = convert_coco(karpathy, root, str(out), on_bad_row="skip", stage2_train=True)

    train = _read_tsv(out / "caption_stage1_train.tsv")
    assert [r[:4] for r in train] == [
        ["100", "1", "A dog runs.", ""],
        ["101", "1", "A dog is running.", ""],
        ["200", "2", "Blue picture.", ""],
    ]
    assert all(len(r) == 5 for r in train)
    assert _decode(train[0][4]).size == (20, 16)
    with open(os.path.join(root, "train2014", "a.jpg"), "rb") as f:
        assert base64.b64decode(train[0][4]) == f.read()  # file bytes kept unchanged
    stage2 = _read_tsv(out / "caption_stage2_train.tsv")
    assert [r[:3] for r in stage2] == [["1", "1", "A dog runs.&&A dog is running."], ["2", "2", "Blue picture."]]
    val = _read_tsv(out / "caption_val.tsv")
    assert [r[:3] for r in val] == [["3", "3", "A green image.&&Green.&&All green"]]
    assert _decode(val[0][4]).getpixel((0, 0))[1] > 150
    test = _read_tsv(out / "caption_test.tsv")
    assert [r[:3] for r in test] == [["4", "4", "A red image."]]

    # OFA's cached CIDEr-D statistics: train (images 1 and 2, ending in <eos> for SCST) and val (image 3)
    with open(out / "cider_cached_tokens" / "coco-train-words.p", "rb") as f:
        cached = pickle.load(f)
    assert cached["ref_len"] == 2.0
    df = cached["document_frequency"]
    assert df[("a", "dog")] == 1 and df[("runs", "<eos>")] == 1 and df[("<eos>",)] == 2 and ("picture",) in df
    with open(out / "cider_cached_tokens" / "coco-valid-words.p", "rb") as f:
        cached = pickle.load(f)
    assert cached["ref_len"] == 1.0 and cached["document_frequency"][("green",)] == 1
    assert ("<eos>",) not in cached["document_frequency"]

    ref = json.loads((out / "caption_val_coco_format.json").read_text())
    assert ref["images"] == [{"id": 3, "file_name": "c.jpg"}]
    assert [(a["image_id"], a["id"], a["caption"]) for a in ref["annotations"]] == [
        (3, 300, "A green image."), (3, 301, "Green."), (3, 302, "All green")
    ]

    bad = [(b.location, b.reason.split(":")[0]) for b in report.bad_rows]
    assert bad == [
        ("images[1].sentences[1]", "caption contains the reference separator '&&'"),
        ("images[4]", "missing image"),
        ("images[5]", "missing field"),
        ("images[6]", "unreadable image"),
        ("images[7]", "unknown split"),
    ]
    assert all(b.source == karpathy for b in report.bad_rows)
    assert report.rows_written == {
        "caption_stage1_train.tsv": 3, "caption_stage2_train.tsv": 2, "caption_val.tsv": 1, "caption_test.tsv": 1
    }
    saved = json.loads((out / "conversion_report.json").read_text())
    assert saved["num_bad_rows"] == 5
    assert saved["bad_row_counts"]["missing image"] == 1
    assert saved["bad_rows"][1]["location"] == "images[4]" and saved["bad_rows"][1]["source"] == karpathy


def test_convert_coco_fail_mode_names_file_and_entry(tmp_path):
    karpathy, root = _coco_fixture(tmp_path)
    with pytest.raises(BadRowError, match=re.escape(karpathy) + r":images\[1\]\.sentences\[1\]: caption contains"):
        coco_cli(["--karpathy-json", karpathy, "--image-root", root, "--out-dir", str(tmp_path / "o")])


def test_convert_coco_limit_and_max_side(tmp_path):
    karpathy, root = _coco_fixture(tmp_path)
    big = os.path.join(root, "val2014", "c.jpg")
    _save_image(big, size=(300, 100), color=(0, 200, 0))
    out = tmp_path / "out"
    convert_coco(karpathy, root, str(out), splits=("val",), on_bad_row="skip", max_side=60, limit=1)
    val = _read_tsv(out / "caption_val.tsv")
    assert len(val) == 1 and _decode(val[0][4]).size == (60, 20)
    assert not (out / "caption_stage1_train.tsv").exists()


# ----------------------------------------------------------------------------- SNLI-VE


def _snli_fixture(tmp_path):
    images = tmp_path / "flickr30k_images"
    _save_image(str(images / "111.jpg"))
    _save_image(str(images / "222.jpg"), color=(0, 0, 255))
    jsonl = tmp_path / "snli_ve"
    jsonl.mkdir()

    def line(fid, premise, hyp, label, pair):
        return json.dumps({"Flickr30K_ID": fid, "sentence1": premise, "sentence2": hyp, "gold_label": label,
                           "pairID": pair, "captionID": f"{fid}.jpg#0"})

    train = [
        line("111", "Two dogs run.", "Animals\tmove.", "entailment", "111.jpg#0r1e"),
        "{not json",  # line 2
        line("111", "Two dogs run.", "Cats sleep.", "-", "111.jpg#0r1x"),  # line 3: unknown label
        line("222", "A man sits.", "A person sits.", "entailment", "222.jpg#0r1e"),
        json.dumps({"Flickr30K_ID": "222", "sentence1": "A man sits.", "gold_label": "neutral", "pairID": "p"}),
        line("333", "A cat.", "An animal.", "entailment", "333.jpg#0r1e"),  # line 6: missing image
        line("222", "A man sits.", "A man stands.", "contradiction", "222.jpg#0r1c"),
    ]
    (jsonl / "snli_ve_train.jsonl").write_text("\n".join(train) + "\n")
    (jsonl / "snli_ve_dev.jsonl").write_text(line("222", "A man sits.", "He is tired.", "neutral", "222.jpg#1r1n") + "\n")
    return str(jsonl), str(images)


def test_convert_snli_ve_skip_mode(tmp_path):
    jsonl_dir, images = _snli_fixture(tmp_path)
    out = tmp_path / "out"
    report = convert_snli_ve(jsonl_dir, images, str(out), splits=("train", "dev"), on_bad_row="skip")
    rows = _read_tsv(out / "snli_ve_train.tsv")
    assert [[r[0], r[1], r[3], r[4], r[5]] for r in rows] == [
        ["0", "111", "Animals move.", "Two dogs run.", "entailment"],
        ["1", "222", "A person sits.", "A man sits.", "entailment"],
        ["2", "222", "A man stands.", "A man sits.", "contradiction"],
    ]
    with open(os.path.join(images, "222.jpg"), "rb") as f:
        assert base64.urlsafe_b64decode(rows[1][2]) == f.read()
    assert _read_tsv(out / "snli_ve_dev.tsv")[0][5] == "neutral"

    train_src = os.path.join(jsonl_dir, "snli_ve_train.jsonl")
    bad = [(b.source, b.location, b.reason.split(":")[0]) for b in report.bad_rows]
    assert bad == [
        (train_src, "line 2", "invalid JSON"),
        (train_src, "line 3", "unknown label"),
        (train_src, "line 5", "missing field"),
        (train_src, "line 6", "missing image"),
    ]
    assert "sentence2" in report.bad_rows[2].reason
    assert report.rows_written == {"snli_ve_train.tsv": 3, "snli_ve_dev.tsv": 1}
    assert json.loads((out / "conversion_report.json").read_text())["bad_row_counts"] == {
        "invalid JSON": 1, "unknown label": 1, "missing field": 1, "missing image": 1
    }


def test_convert_snli_ve_fail_mode_and_pair_ids(tmp_path):
    jsonl_dir, images = _snli_fixture(tmp_path)
    train_src = os.path.join(jsonl_dir, "snli_ve_train.jsonl")
    with pytest.raises(BadRowError, match=re.escape(train_src) + ":line 2: invalid JSON"):
        convert_snli_ve(jsonl_dir, images, str(tmp_path / "o1"), splits=("train",))
    out = tmp_path / "o2"
    convert_snli_ve(jsonl_dir, images, str(out), splits=("dev",), uniq_id="pair_id")
    assert _read_tsv(out / "snli_ve_dev.tsv")[0][0] == "222.jpg#1r1n"
    with pytest.raises(FileNotFoundError, match="snli_ve_test.jsonl"):
        convert_snli_ve(jsonl_dir, images, str(tmp_path / "o3"), splits=("test",))


# ----------------------------------------------------------------------------- synthetic task

SMALL = dict(num_train=40, num_valid=12, num_test=12)
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4}
T, F, U = "T", "F", "U"
TRUTH_TO_LABEL = {T: "entailment", F: "contradiction", U: "neutral"}
OBJECT_RE = re.compile(r"(small|large) (\w+) (\w+) r(\d)c(\d)")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return build_synthetic_task(str(out), seed=3, **SMALL)


def _scene(meta_row):
    scene = {}
    for text in meta_row["objects"]:
        size, color, shape, row, col = OBJECT_RE.fullmatch(text).groups()
        scene[shape] = {"size": size, "color": None if color == "hollow" else color, "row": int(row), "col": int(col)}
    return scene


def _kleene(*values):
    return F if F in values else (U if U in values else T)


def _attribute_truth(obj, word):
    if word in ("small", "large"):
        return T if obj["size"] == word else F
    if word == "hollow":
        return T if obj["color"] is None else F
    if word in HIDDEN_PROPERTIES:
        return U
    assert word in COLORS, word
    return U if obj["color"] is None else (T if obj["color"] == word else F)


def _descriptor_truth(scene, words):
    *color, shape = words
    if not color:
        return T, scene[shape]
    return _attribute_truth(scene[shape], color[0]), scene[shape]


def _relation_truth(a, rel, b):
    if rel in ("left of", "right of"):
        assert a["col"] != b["col"]
        return T if (a["col"] < b["col"]) == (rel == "left of") else F
    assert a["row"] != b["row"]
    return T if (a["row"] < b["row"]) == (rel == "above") else F


def _judge(scene, hyp):
    """Independent reading of the hypothesis grammar: its truth value in the scene."""
    if m := re.fullmatch(r"there (?:is|are) (\w+) shapes?", hyp):
        return T if NUMBERS[m.group(1)] == len(scene) else F
    if m := re.fullmatch(r"there is an? (\w+)", hyp):
        return T if m.group(1) in scene else F
    if m := re.fullmatch(r"there is an? (\w+) (\w+)", hyp):
        color, shape = m.groups()
        return _attribute_truth(scene[shape], color) if shape in scene else F
    if m := re.fullmatch(r"the (\w+) is (\w+) and the (\w+) is (\w+)", hyp):
        s1, w1, s2, w2 = m.groups()
        return _kleene(_attribute_truth(scene[s1], w1), _attribute_truth(scene[s2], w2))
    if m := re.fullmatch(r"the (\w+) is (\w+)", hyp):
        return _attribute_truth(scene[m.group(1)], m.group(2))
    m = re.fullmatch(r"the ((?:\w+ )?\w+) is (left of|right of|above|below) the ((?:\w+ )?\w+)", hyp)
    assert m, f"hypothesis outside the grammar: {hyp!r}"
    truth_a, a = _descriptor_truth(scene, m.group(1).split())
    truth_b, b = _descriptor_truth(scene, m.group(3).split())
    return _kleene(_relation_truth(a, m.group(2), b), truth_a, truth_b)


def _noun_phrases(text):
    return re.findall(r"\ban? (?:(small|large) )?(\w+) (circle|square|triangle|star|cross)\b", text)


def _check_description(scene, text):
    for size, color, shape in _noun_phrases(text):
        obj = scene[shape]
        assert color == (obj["color"] or "hollow"), text
        assert not size or size == obj["size"], text


def test_synthetic_task_is_deterministic(synthetic, tmp_path):
    again = build_synthetic_task(str(tmp_path / "again"), seed=3, **SMALL)
    assert set(again) == set(synthetic)
    for key, path in synthetic.items():
        assert filecmp.cmp(path, again[key], shallow=False), key
    other = build_synthetic_task(str(tmp_path / "other"), seed=4, **SMALL)
    assert not filecmp.cmp(synthetic["snli_ve_train"], other["snli_ve_train"], shallow=False)


def test_synthetic_caption_files(synthetic):
    cfg = SyntheticTaskConfig()
    train = _read_tsv(synthetic["caption_train"])
    assert len(train) == SMALL["num_train"] * cfg.captions_per_image
    assert all(len(r) == 5 for r in train)
    meta = load_meta(synthetic["caption_train_meta"])
    assert [int(r[0]) for r in train] == list(meta)
    for row in train:
        record = meta[int(row[0])]
        scene = _scene(record)
        assert int(row[1]) == record["image_id"] and record["difficulty"] == len(scene)
        assert "&&" not in row[2] and len(_noun_phrases(row[2])) == len(scene)
        _check_description(scene, row[2])
        assert row[3].split("&&") == list(scene)
    image = _decode(train[0][4])
    assert image.size == (cfg.image_size, cfg.image_size) and image.mode == "RGB"

    for split, n in (("valid", SMALL["num_valid"]), ("test", SMALL["num_test"])):
        rows = _read_tsv(synthetic[f"caption_{split}"])
        assert len(rows) == n and all(r[0] == r[1] for r in rows)
        coco = json.loads(Path(synthetic[f"caption_{split}_coco"]).read_text())
        assert [img["id"] for img in coco["images"]] == [int(r[1]) for r in rows]
        refs = {}
        for ann in coco["annotations"]:
            refs.setdefault(ann["image_id"], []).append(ann["caption"])
        for row in rows:
            captions = row[2].split("&&")
            assert len(captions) == cfg.captions_per_image and len(set(captions)) == len(captions)
            assert refs[int(row[1])] == captions
    # OFA's cached CIDEr-D statistics (--eval-cider-cached-tokens, --scst-cider-cached-tokens)
    for split, n in (("train", SMALL["num_train"]), ("valid", SMALL["num_valid"])):
        path = Path(synthetic[f"cider_cached_{split}"])
        assert path.name == f"coco-{split}-words.p"
        with open(path, "rb") as f:
            cached = pickle.load(f)
        assert cached["ref_len"] == n  # images, not their log
        some_caption = _read_tsv(synthetic[f"caption_{split}"])[0][2].split("&&")[0].split()
        assert cached["document_frequency"][tuple(some_caption[:2])] >= 1
        # SCST (train) scores sentences ending in the word <eos>, as OFA's training n-grams do
        ending = (*some_caption[-2:], "<eos>")
        assert (cached["document_frequency"].get(ending, 0) >= 1) == (split == "train")
    # OFA's stage-2 (SCST) training file: one row per training image, all its captions joined by &&
    stage2 = _read_tsv(synthetic["caption_stage2_train"])
    train = _read_tsv(synthetic["caption_train"])
    assert len(stage2) == SMALL["num_train"] and all(r[0] == r[1] for r in stage2)
    for row in stage2:
        assert row[2].split("&&") == [r[2] for r in train if r[1] == row[1]]
        assert row[3:] == next(r[3:] for r in train if r[1] == row[1])  # labels and image as in train
    ids = [int(r[1]) for s in ("train", "valid", "test") for r in _read_tsv(synthetic[f"caption_{s}"])]
    assert len(set(ids)) == SMALL["num_train"] + SMALL["num_valid"] + SMALL["num_test"]  # image ids unique


def test_synthetic_snli_ve_labels_are_correct_and_balanced(synthetic):
    levels = Counter()
    for split, n in SMALL.items():
        split = split[len("num_"):]
        rows = _read_tsv(synthetic[f"snli_ve_{split}"])
        meta = load_meta(synthetic[f"snli_ve_{split}_meta"])
        assert len(rows) == n * SyntheticTaskConfig().hypotheses_per_image
        assert all(len(r) == 6 for r in rows)
        counts = Counter(r[5] for r in rows)
        assert set(counts) == {"entailment", "neutral", "contradiction"}
        assert max(counts.values()) - min(counts.values()) <= 1
        for uniq_id, image_id, image_b64, hyp, premise, label in rows:
            record = meta[int(uniq_id)]
            assert record["label"] == label and record["image_id"] == int(image_id)
            scene = _scene(record)
            assert TRUTH_TO_LABEL[_judge(scene, hyp)] == label, (hyp, record["objects"])
            _check_description(scene, premise)
            assert 1 <= len(_noun_phrases(premise)) <= 2
            levels[record["difficulty"]] += 1
        assert _decode(rows[0][2]).size == (SyntheticTaskConfig().image_size,) * 2
    assert set(levels) == {1, 2, 3, 4}
    assert levels[3] + levels[4] >= 0.3 * sum(levels.values())  # enough rows that need composition


def test_synthetic_texts_tokenize_with_ofa_bpe(synthetic):
    bpe_dir = require_file(BPE_DIR)
    from fairseq.data.encoders.gpt2_bpe_utils import get_encoder

    encoder = get_encoder(str(bpe_dir / "encoder.json"), str(bpe_dir / "vocab.bpe"))
    known = {line.split(" ")[0] for line in (bpe_dir / "dict.txt").read_text().splitlines()}
    texts = set()
    for split in ("train", "valid", "test"):
        for row in _read_tsv(synthetic[f"caption_{split}"]):
            texts.update(row[2].split("&&"))
        for row in _read_tsv(synthetic[f"snli_ve_{split}"]):
            texts.update((row[3], row[4]))
    words = {w for t in texts for w in t.split()}
    assert len(words) < 60  # small vocabulary
    for text in sorted(texts):
        ids = encoder.encode(" " + text)
        assert encoder.decode(ids) == " " + text
        unknown = [i for i in ids if str(i) not in known]
        assert not unknown, f"{text!r} has BPE ids missing from dict.txt: {unknown}"
    # Every word is a single BPE token here, so the models see whole words.
    assert all(len(encoder.encode(" " + w)) == 1 for w in words), sorted(w for w in words if len(encoder.encode(" " + w)) > 1)


def test_synthetic_cli_and_config_checks(tmp_path):
    paths = synthetic_cli([
        "--out", str(tmp_path), "--seed", "5", "--num-train", "3", "--num-valid", "2", "--num-test", "2",
        "--image-size", "64", "--max-objects", "2", "--type-weights", '{"relation": 0, "conjunction": 5}',
    ])
    info = json.loads(Path(paths["info"]).read_text())
    assert info["seed"] == 5 and info["config"]["image_size"] == 64
    assert info["config"]["type_weights"]["relation"] == 0
    meta = load_meta(paths["snli_ve_train_meta"])
    assert all(r["num_objects"] <= 2 and r["hypothesis_type"] != "relation" for r in meta.values())
    assert _decode(_read_tsv(paths["snli_ve_valid"])[0][2]).size == (64, 64)
    with pytest.raises(ValueError, match="unknown hypothesis types"):
        SyntheticTaskConfig(type_weights={"teleport": 1.0})
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticTaskConfig(max_objects=6)
