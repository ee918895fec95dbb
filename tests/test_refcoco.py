"""Task `refcoco`: location-token quantisation and decoding, Acc@0.5, OFA-format rows, bad input,
constrained generation, and a tiny model trained, validated and evaluated through the CLIs."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ofa_fixtures import BPE_DIR, require_file
from ofa_tsv_rows import png_base64, write_tsv
from tiny_checkpoint import tiny_checkpoint

import mue_fairseq  # noqa: F401
from mue_fairseq.data.location_tokens import bins_to_boxes, box_hits, quantize_box, resize_ratios
from mue_fairseq.tasks.refcoco import RefcocoConfig, RefcocoTask

BIN_0 = 59457 - 1000  # OFA's dictionary: 50,265 BPE entries (+4 specials), <mask>, 8192 codes, then the bins
EVAL_GENERATION = ["--beam", "5", "--min-len", "4", "--max-len-a", "0", "--max-len-b", "4"]


def make_task(**overrides) -> RefcocoTask:
    require_file(BPE_DIR)
    cfg = OmegaConf.structured(RefcocoConfig(bpe_dir=str(BPE_DIR), selected_cols="0,4,2,3", **overrides))
    return RefcocoTask.setup_task(cfg)


def image_row(uid: str, text: str, box: str, width: int = 200, height: int = 100):
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (200, 30, 30)
    return [uid, "img", text, box, png_base64(pixels)]


# --------------------------------------------------------------------------- quantisation by hand
def test_quantize_box_by_hand():
    # 200x100 image to a 64 square: ratios 0.32 / 0.64; box (50,20,150,80) -> (16,12.8,48,51.2)
    # / 64 -> (0.25,0.2,0.75,0.8) * 999 -> (249.75,199.8,749.25,799.2) -> round.
    assert quantize_box([50, 20, 150, 80], 200, 100, 64, 64, 1000) == [250, 200, 749, 799]
    # torch rounds half to even, as OFA: 8/64*4 = 0.5 -> 0, 24/64*4 = 1.5 -> 2, 40/64*4 = 2.5 -> 2.
    assert quantize_box([8, 8, 24, 40], 64, 64, 64, 64, 5) == [0, 0, 2, 2]
    # --max-image-size above the patch size leaves the top bins unused.
    assert quantize_box([0, 0, 64, 64], 64, 64, 64, 128, 1000) == [0, 0, 500, 500]


def test_box_round_trip_within_half_a_bin():
    box = [50.0, 20.0, 150.0, 80.0]
    bins = torch.tensor([quantize_box(box, 200, 100, 64, 64, 1000)])
    ratio_w, ratio_h = resize_ratios(200, 100, 64)
    assert (float(ratio_w), float(ratio_h)) == (0.3199999928474426, 0.6399999856948853)  # float32 of 0.32 / 0.64
    decoded = bins_to_boxes(bins, ratio_w.view(1), ratio_h.view(1), 1000, 64)[0]
    # One bin spans 64/999 px of the 64 px square: 0.2 px of width here (/0.32), 0.1 px of height (/0.64).
    half_bin = torch.tensor([0.5 * 64 / 999 / 0.32, 0.5 * 64 / 999 / 0.64] * 2)
    assert torch.all((decoded - torch.tensor(box)).abs() <= half_bin + 1e-4)
    assert decoded[0].item() == pytest.approx(250 / 999 * 64 / 0.32, rel=1e-6)


def test_iou_hits_by_hand():
    pred = torch.tensor([[0.0, 0, 10, 10]] * 5 + [[0.0, 0, 0.01, 0.01]])
    ref = torch.tensor([
        [5.0, 0, 15, 10],  # IoU 50/150: miss
        [0.0, 0, 10, 19],  # IoU 100/190 = 0.53: hit
        [0.0, 0, 10, 20],  # IoU 100/200 = 0.5 (OFA's 1e-6 on the union vanishes in float32 at 200): hit
        [20.0, 20, 30, 30],  # disjoint: the signed "intersection" (-10 x -10) is positive, still a miss
        [10.0, 0, 20, 10],  # touching edges: intersection width 0, a miss
        [0.0, 0, 0.01, 0.02],  # IoU 0.5 of tiny boxes: 1e-6 on a union of 2e-4 tips it to a miss
    ])
    assert box_hits(pred, ref).tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------- dataset rows
def test_dataset_row_token_ids(tmp_path):
    task = make_task(patch_image_size=64, max_image_size=64)
    task.cfg.data = str(write_tsv(tmp_path / "ref.tsv", [image_row("79_1", "The Red half.", "50,20,150,80")]))
    task.load_dataset("valid")
    item = task.datasets["valid"][0]
    bins = [BIN_0 + 250, BIN_0 + 200, BIN_0 + 749, BIN_0 + 799]
    assert [task.tgt_dict[i] for i in bins] == ["<bin_250>", "<bin_200>", "<bin_749>", "<bin_799>"]
    assert item["target"].tolist() == bins + [task.tgt_dict.eos()]
    assert item["prev_output_tokens"].tolist() == [task.tgt_dict.bos()] + bins
    prompt = task.bpe.decode(task.tgt_dict.string(item["source"][1:-1]))
    assert prompt == ' which region does the text " the red half. " describe?'
    assert item["source"][0] == task.tgt_dict.bos() and item["source"][-1] == task.tgt_dict.eos()
    batch = task.datasets["valid"].collater([item])
    assert batch["region_coords"].tolist() == [[50.0, 20.0, 150.0, 80.0]]
    assert batch["w_resize_ratios"].tolist() == [pytest.approx(0.32)]
    assert batch["net_input"]["patch_images"].shape == (1, 3, 64, 64)
    # The reference tokens decode back onto the reference box: a hit.
    hypos = [[{"tokens": batch["target"][0]}]]
    boxes, hits = task.boxes_and_hits(batch, hypos)
    assert hits.tolist() == [1.0]
    rows, scores = task.evaluation_rows(batch, hypos)
    assert rows[0]["uniq_id"] == "79_1" and rows[0]["box"] == pytest.approx([50.05, 20.02, 149.95, 79.99], abs=0.05)
    assert scores == [1.0]


@pytest.mark.parametrize("box, message", [
    ("50,20,250,80", "outside the 200x100 image"),
    ("-5,20,150,80", "outside the 200x100 image"),
    ("150,20,50,80", "empty or inverted"),
    ("50,20,150", "not four comma-separated numbers"),
])
def test_bad_box_names_the_row(tmp_path, box, message):
    task = make_task(patch_image_size=64, max_image_size=64)
    rows = [image_row("1_0", "fine", "1,1,20,20"), image_row("7_3", "bad", box)]
    task.cfg.data = str(write_tsv(tmp_path / "ref.tsv", rows))
    task.load_dataset("valid")
    task.datasets["valid"][0]
    with pytest.raises(ValueError, match=rf"row 7_3 \(.*ref.tsv, line 2\).*{message}"):
        task.datasets["valid"][1]


def test_max_image_size_below_patch_size_is_refused(tmp_path):
    task = make_task(patch_image_size=64, max_image_size=32)
    task.cfg.data = str(write_tsv(tmp_path / "ref.tsv", [image_row("2_0", "x", "0,0,200,100")]))
    task.load_dataset("valid")
    with pytest.raises(ValueError, match=r"row 2_0 .*outside 0..999: --max-image-size 32 must be at least"):
        task.datasets["valid"][0]


def test_hypothesis_of_wrong_length_is_refused():
    task = make_task()
    with pytest.raises(ValueError, match="decode with --min-len 4 --max-len-a 0 --max-len-b 4"):
        task.hypothesis_bins([[{"tokens": torch.tensor([BIN_0, BIN_0, 2])}]])


# --------------------------------------------------------------------------- tiny model, CLIs
@pytest.fixture(scope="module")
def refcoco_checkpoint(tmp_path_factory):
    return tiny_checkpoint("refcoco", tmp_path_factory, extra_args=[
        "--eval-acc", "--eval-args", json.dumps({"beam": 5, "min_len": 4, "max_len_a": 0, "max_len_b": 4}),
        "--best-checkpoint-metric", "score", "--maximize-best-checkpoint-metric", "--validate-interval", "100",
    ])


def test_fairseq_train_validates_and_evaluate_cli_agrees(refcoco_checkpoint, tmp_path):
    from mue_fairseq.cli.evaluate import cli_main

    state = torch.load(refcoco_checkpoint.checkpoint, weights_only=False)
    validation_score = state["extra_state"]["best"]  # the `score` (Acc@0.5) of the validation at the end
    results = tmp_path / "results"
    result = cli_main(refcoco_checkpoint.eval_args() + EVAL_GENERATION + [
        "--results-path", str(results), "--no-plots", "--mue-decoder-threshold", "0.5"])
    assert result.num_samples == 6
    predictions = json.loads((results / "valid_predict.json").read_text())
    assert [p["uniq_id"] for p in predictions] == [f"{i}_0" for i in range(4, 10)]
    assert all(len(p["box"]) == 4 for p in predictions)
    exits = json.loads((results / "valid_exit_stats.json").read_text())
    by_position = exits["summary"]["decoder_by_position"]
    assert by_position["tokens"] == [6] * 5  # x0, y0, x1, y1 and eos of six boxes
    assert all(1 <= mean <= 2 for mean in by_position["mean"])
    # Full-depth evaluation reproduces the validation's Acc@0.5.
    full = cli_main(refcoco_checkpoint.eval_args() + EVAL_GENERATION + ["--results-path", str(tmp_path / "full"),
                                                                     "--no-plots"])
    assert full.scores["accuracy"] == pytest.approx(100 * validation_score, abs=0.005)  # logged to 4 digits


def test_constraint_range_keeps_boxes_to_location_tokens(refcoco_checkpoint, tmp_path):
    from mue_fairseq.cli.evaluate import load_for_evaluation, parse_evaluation_args

    args = parse_evaluation_args(refcoco_checkpoint.eval_args() + EVAL_GENERATION + [
        "--model-overrides", repr({"bpe_dir": refcoco_checkpoint.bpe_dir, "constraint_range": f"{BIN_0},59457"})])
    models, task, cfg = load_for_evaluation(args)
    task.load_dataset("valid")
    dataset = task.datasets["valid"]
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    hypos = task.inference_step(task.build_generator(models, cfg.generation), models, sample)
    tokens = torch.stack([h[0]["tokens"] for h in hypos])
    assert tokens.shape == (6, 5) and (tokens[:, 4] == task.tgt_dict.eos()).all()
    # OFA's range keeps the ids 0-3 too (bos and unk may still come out of an untrained model; pad
    # never, eos not before the fourth token): nothing else outside the bins.
    box_tokens = tokens[:, :4]
    assert (((box_tokens >= BIN_0) & (box_tokens < 59457)) | (box_tokens == 0) | (box_tokens == 3)).all()
    assert ((box_tokens >= BIN_0) & (box_tokens < 59457)).any()
    # A non-location token decodes as OFA decodes it (an index below 0) and the box is a miss.
    bins = task.hypothesis_bins(hypos)
    assert torch.equal(bins < 0, box_tokens < BIN_0)
    _, hits = task.boxes_and_hits(sample, hypos)
    assert all(hit == 0 for hit, row in zip(hits.tolist(), bins) if (row < 0).any())


def test_fairseq_generate_prints_location_tokens(refcoco_checkpoint, capsys):
    from fairseq import options
    from fairseq_cli import generate

    argv = [str(refcoco_checkpoint.split("valid")), "--path", str(refcoco_checkpoint.checkpoint), "--user-dir",
            str(mue_fairseq.__path__[0]), "--task", "refcoco", "--gen-subset", "valid", "--batch-size", "4",
            "--cpu", "--num-workers", "0", "--bpe-dir", refcoco_checkpoint.bpe_dir, "--selected-cols", "0,4,2,3",
            "--patch-image-size", "64", "--max-image-size", "64", "--constraint-range", f"{BIN_0},59457",
            *EVAL_GENERATION]
    generate.main(options.parse_args_and_arch(options.get_generation_parser(), argv))
    hypotheses = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line.startswith("H-")]
    assert sorted(h[0] for h in hypotheses) == sorted(f"H-{i}_0" for i in range(4, 10))
    # Four tokens each; bos and unk (which OFA's range keeps) print as nothing / <unk>, the rest as bins.
    words = [text.split() for _, _, text in hypotheses]
    assert all(3 <= len(w) <= 4 and all(x.startswith("<bin_") or x == "<unk>" for x in w) for w in words)


def test_synthetic_grounding_boxes_enclose_their_objects(tmp_path):
    import base64
    import io

    from PIL import Image

    from data_utils.synthetic.scene import COLORS
    from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

    paths = build_vqa_grounding_task(str(tmp_path), seed=5, num_train=1, num_valid=12, num_test=1,
                                     expressions_per_image=3)
    meta = [json.loads(line) for line in open(paths["refcoco_valid_meta"])]
    checked = 0
    for row, info in zip(open(paths["refcoco_valid"]).read().splitlines(), meta):
        uid, _, text, region, image_b64 = row.split("\t")
        assert uid == info["uniq_id"]
        image = Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")
        assert image.size == (info["width"], info["height"])
        x0, y0, x1, y1 = map(float, region.split(","))
        assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
        shape = text.split()[{1: 1, 2: 2, 3: 3}[info["level"]]]
        size, color, _, _ = next(o for o in info["objects"] if o.split()[2] == shape).split()
        assert (info["level"] < 2 or color in text) and (info["level"] < 3 or size in text)
        if color in COLORS:  # filled: its pixels (in the box grown by 2 px) span the box, to a pixel or two
            pixels = np.array(image)[max(int(y0) - 2, 0): int(y1) + 3, max(int(x0) - 2, 0): int(x1) + 3]
            ys, xs = np.nonzero(np.all(pixels == COLORS[color], axis=2))
            left, top = max(int(x0) - 2, 0), max(int(y0) - 2, 0)
            assert abs(left + xs.min() - x0) <= 2 and abs(left + xs.max() + 1 - x1) <= 2
            assert abs(top + ys.min() - y0) <= 2 and abs(top + ys.max() + 1 - y1) <= 2
            checked += 1
    assert checked >= 3


def test_prediction_exits_judge_the_constraint_range(refcoco_checkpoint, tmp_path):
    """With --constraint-range the entropy policy judges the 1,004 tokens the range keeps: at most
    ln(1004) nats, so that threshold stops every token after one layer."""
    import math

    from mue_fairseq.cli.evaluate import cli_main

    overrides = {"bpe_dir": refcoco_checkpoint.bpe_dir, "constraint_range": f"{BIN_0},59457"}
    result = cli_main(refcoco_checkpoint.eval_args() + EVAL_GENERATION + [
        "--results-path", str(tmp_path / "range"), "--no-plots", "--model-overrides", repr(overrides),
        "--mue-exit-policy", "entropy", "--mue-entropy-threshold", str(math.log(1004) + 1e-3)])
    assert result.num_samples == 6
    exits = json.loads((tmp_path / "range" / "valid_exit_stats.json").read_text())
    assert exits["summary"]["decoder_by_position"]["mean"] == [1.0] * 5
