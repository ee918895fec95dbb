"""The exit-policy benchmark's report logic (no timing here): which setting each policy is credited
with, the depth check, and the tables."""
import argparse
from pathlib import Path

import pytest

from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_exit_policies.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


def row(policy, value, quality, speedup, batch=1, task="snli_ve", knob="k"):
    return {"task": task, "batch_size": batch, "policy": policy, "knob": knob, "value": value, "metric": "accuracy",
            "quality": quality, "quality_ratio": quality / 80.0, "meets_target": quality >= 0.99 * 80.0,
            "measured_speedup": speedup, "expected_speedup": speedup, "seconds": 10.0 / speedup, "num_samples": 10,
            "image_layers": 6.0, "text_layers": 6.0, "decoder_layers": 6.0}


def rows_for(batch, mue_speedup):
    return [
        row("full depth", "", 80.0, 1.0, batch),
        row("static", 5, 79.5, 1.2, batch), row("static", 3, 70.0, 2.0, batch),
        row("entropy", 0.5, 79.5, 1.3, batch), row("entropy", 2.0, 60.0, 2.5, batch),
        row("patience", 1, 75.0, 1.6, batch),  # never meets the target
        row("confidence", 0.9, 80.0, 1.1, batch),
        row("MuE", 0.95, 79.3, mue_speedup, batch), row("MuE", 0.9, 79.9, 1.4, batch),
    ]


def test_each_policy_is_credited_with_its_fastest_setting_at_the_target(bench):
    summary = bench.summarise(rows_for(1, 2.2) + rows_for(16, 1.9))
    entry = summary["snli_ve"]["batches"][1]
    chosen = {policy: (r["value"] if r else None) for policy, r in entry["chosen"].items()}
    assert chosen == {"full depth": "", "static": 5, "entropy": 0.5, "patience": None, "confidence": 0.9, "MuE": 0.95}
    assert entry["best_other_speedup"] == pytest.approx(1.3)
    assert entry["static_half_loss_points"] == pytest.approx(10.0)  # 6 layers: half is 3
    # (1.9 - 1) / (2.2 - 1) of the batch-1 gain is kept at batch 16.
    assert summary["snli_ve"]["mue_speedup_kept_at_largest_batch"] == pytest.approx(0.9 / 1.2)


def test_tables_flag_missed_targets_and_too_easy_tasks(bench):
    rows = rows_for(1, 2.2)
    for r in rows:
        if r["policy"] == "static" and r["value"] == 3:
            r["quality"] = 78.0  # half depth loses only 2 points
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "| patience (PABEE) (none meets the target: best quality shown) | k 1 | 75.00 |" in text
    assert "| MuE (similarity) | k 0.95 | 79.30 |" in text and "2.20x" in text
    assert "static half depth loses 2.00 points (< 5: the model does not need its depth" in text
    # The paper's measure, from the layers run: half of them skipped is 2x, whatever the clock says.
    mue = next(r for r in rows if r["policy"] == "MuE" and r["value"] == 0.95)
    mue["expected_reduction_layers"] = 0.5
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "| MuE (similarity) | k 0.95 | 79.30 | 99.1% | 6.0 / 6.0 / 6.0 | 2.20x | 2.20x | 2.00x |" in text


def test_mue_decoder_alone_is_swept_with_full_depth_streams_and_gets_its_own_row(bench):
    points = bench.policy_settings(6, [], [], [], [0.95], [0.9])
    together, decoder_alone = [p for p in points if p["policy"] == "MuE"]
    assert together["options"] == {"mue_image_threshold": 0.95, "mue_text_threshold": 0.95,
                                   "mue_decoder_threshold": 0.95}
    # Evaluation starts from NEUTRAL, so the streams' thresholds stay at 1: full depth.
    options = {**bench.NEUTRAL, **decoder_alone["options"]}
    assert (options["mue_image_threshold"], options["mue_text_threshold"], options["mue_decoder_threshold"]) == (
        1.0, 1.0, 0.9)
    rows = rows_for(1, 2.2) + [row("MuE", 0.8, 79.6, 1.8, knob="decoder threshold (img = txt = 1)"),
                               row("MuE", 0.5, 70.0, 3.0, knob="decoder threshold (img = txt = 1)")]
    summary = bench.summarise(rows)
    assert summary["snli_ve"]["batches"][1]["mue_best"]["value"] == 0.95  # fastest MuE setting at the target
    text = bench.markdown(rows, summary, {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "| MuE (similarity) | k 0.95 | 79.30 |" in text
    assert "| MuE (similarity) | decoder threshold (img = txt = 1) 0.8 | 79.60 |" in text


def test_points_mue_does_not_dominate_are_named(bench):
    rows = rows_for(1, 2.2)
    escaped = bench.not_dominated_by_mue(rows)
    # entropy 2.0 is faster than every MuE setting; confidence 0.9 keeps more accuracy than any of them.
    assert [(r["policy"], r["value"]) for r in escaped] == [("entropy", 2.0), ("confidence", 0.9)]
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "not dominated by any MuE setting: entropy (DeeBERT) k 2.0 (2.50x, 60.00), confidence (CALM) k 0.9" in text
    assert "(speed-up target 2x: met;" in text
    rows = [r for r in rows if r["policy"] in ("full depth", "MuE", "static")]
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "MuE's front dominates every other policy's front" in text


def test_pareto_front_keeps_only_undominated_points(bench):
    points = [row("MuE", v, q, s) for v, q, s in [(1, 80, 1.0), (2, 79, 1.5), (3, 78, 1.4), (4, 70, 2.0)]]
    assert [r["value"] for r in bench.pareto(points)] == [1, 2, 4]


def test_generated_section_is_replaced_in_place_and_other_text_stays(bench, tmp_path):
    from markdown_section import update_section  # benchmarks/ is on the path once the script is loaded

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nhand-written intro\n")
    update_section(path, "## Policies", "<!-- b -->", "<!-- e -->", "first")
    path.write_text(path.read_text() + "\nhand-written notes after\n")
    update_section(path, "## Policies", "<!-- b -->", "<!-- e -->", "second")
    text = path.read_text()
    assert text.count("## Policies") == 1 and "first" not in text
    assert text.index("hand-written intro") < text.index("<!-- b -->\nsecond\n<!-- e -->") < text.index(
        "hand-written notes after")


def test_accuracy_by_difficulty_reads_the_generators_meta_records(bench):
    meta = {1: {"difficulty": 1, "label": "entailment"}, 2: {"difficulty": 1, "label": "neutral"},
            3: {"difficulty": 3, "label": "contradiction"}}
    predictions = [{"uniq_id": 1, "answer": "yes"}, {"uniq_id": 2, "answer": "no"}, {"uniq_id": 3, "answer": "no"}]
    assert bench.accuracy_by_difficulty(predictions, meta) == {"1": 50.0, "3": 100.0}
    rows = rows_for(1, 2.2)
    for r in rows:
        r["quality_by_difficulty"] = {"1": 90.0, "2": 70.0} if r["policy"] != "MuE" else {"1": 91.0, "2": 69.0}
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert "full depth 90.0 / 70.0; static half depth 90.0 / 70.0; MuE at the target 91.0 / 69.0." in text
    rows += [dict(r, batch_size=16) for r in rows]
    text = bench.markdown(rows, bench.summarise(rows), {"command": "cmd", "model": "m", "samples": 10, "machine": "x"})
    assert text.count("Accuracy by hypothesis difficulty") == 1  # same answers at every batch size: once


def test_caption_content_check_names_wrong_colours_and_shapes():
    from mue_fairseq.metrics.synthetic_content import caption_content_accuracy, named_objects

    meta = {7: {"objects": ["large purple star r0c1"]},
            8: {"objects": ["small hollow triangle r1c0", "large red circle r0c2"]}}
    assert named_objects("a red circle right of a small hollow triangle") == ["red circle", "hollow triangle"]
    predictions = [{"image_id": 7, "caption": "at the top a large purple star"},      # right
                   {"image_id": 8, "caption": "a hollow triangle left of a red star"}]  # wrong shape
    assert caption_content_accuracy(predictions, meta) == 50.0
    predictions[1]["caption"] = "a hollow triangle left of a large red circle"
    assert caption_content_accuracy(predictions, meta) == 100.0


def test_finetune_from_model_reaches_training_and_a_missing_file_is_refused(bench, tmp_path, monkeypatch):
    from mue_fairseq.cli import quickstart

    start = tmp_path / "caption_model.pt"
    with pytest.raises(SystemExit):  # argparse's error: named option, nothing trained
        bench.main(["--from-json", "unused.json", "--finetune-from-model", str(start)])
    start.write_bytes(b"weights")
    seen = {}

    class Trained(Exception):
        pass

    def fake_train(task, data_dir, save_dir, updates, batch_size, bpe_dir, extra_args=()):
        seen["args"] = list(extra_args)
        raise Trained

    monkeypatch.setattr(quickstart, "train", fake_train)
    args = argparse.Namespace(pretrain_backbone_steps=0, freeze_encoder_layers_updates=400,
                              finetune_from_model=str(start), updates=10, train_batch_size=16)
    with pytest.raises(Trained):
        bench.sweep_task("snli_ve", tmp_path, tmp_path / "data", "bpe", args)
    assert seen["args"] == ["--freeze-encoder-layers-updates", "400", "--finetune-from-model", str(start)]


def test_exit_ceiling_times_full_depth_against_one_layer_everywhere(tmp_path, tmp_path_factory):
    import json
    import sys

    from tiny_checkpoint import LAYERS, tiny_checkpoint

    tiny = tiny_checkpoint("caption", tmp_path_factory)
    sys.path.insert(0, str(SCRIPT.parent))
    import exit_ceiling

    out = tmp_path / "ceiling.json"
    common = ["--work-dir", str(tiny.data_dir.parent), "--task", "caption", "--bpe-dir", tiny.bpe_dir,
              "--max-samples", "2", "--batch-sizes", "1,2", "--repeats", "1", "--out", str(out)]
    with pytest.raises(SystemExit):  # a missing checkpoint is named before anything loads
        exit_ceiling.main(common + ["--checkpoint", str(tmp_path / "missing.pt")])
    report = exit_ceiling.main(common + ["--checkpoint", str(tiny.checkpoint)])
    assert json.loads(out.read_text())["rows"] == report["rows"]
    assert [row["batch_size"] for row in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["num_samples"] == 2
        for name, depth in (("full depth", LAYERS), ("depth 1", 1)):
            means = row["mean_exit_layers"][name]
            assert (means["image"], means["text"], means["decoder"]) == (depth, depth, depth), name
        full, shallow = (row["ms_per_sample"][name] for name in ("full depth", "depth 1"))
        assert row["ceiling_speedup"] == pytest.approx(full / shallow)


def test_timing_rounds_interleave_settings_keep_the_fastest_and_catch_leaks(bench):
    class Result:
        def __init__(self, quality, seconds):
            self._quality, self.seconds = quality, seconds

        def quality(self):
            return self._quality

    points = [{"policy": "full depth", "value": ""}, {"policy": "MuE", "value": 0.9}]
    times = iter([5.0, 3.0, 4.0, 2.5, 4.5])  # full, MuE, full, MuE, full again at the end
    order = []

    def run_point(point):
        order.append(point["policy"])
        return Result(80.0 if point["policy"] == "full depth" else 79.0, next(times)), "stats"

    timed = bench.timed_rounds(points, run_point, repeats=2)
    assert order == ["full depth", "MuE", "full depth", "MuE", "full depth"]
    assert [entry["seconds_repeats"] for entry in timed] == [[5.0, 4.0, 4.5], [3.0, 2.5]]
    assert [entry["seconds"] for entry in timed] == [4.0, 2.5]
    assert timed[1]["result"].quality() == 79.0 and timed[1]["stats"] == "stats"

    qualities = iter([80.0, 79.0, 80.0, 78.0])  # MuE's second round differs: some setting leaked

    def leaky(point):
        return Result(next(qualities), 1.0), None

    with pytest.raises(RuntimeError, match="MuE 0.9: quality 79.0 then 78.0"):
        bench.timed_rounds(points, leaky, repeats=2)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.timed_rounds(points, run_point, repeats=0)
    text = bench.markdown(rows_for(1, 2.2), bench.summarise(rows_for(1, 2.2)),
                          {"command": "cmd", "model": "m", "samples": 10, "machine": "x", "repeats": 3})
    assert "every setting timed in 3 interleaved rounds" in text


def test_merged_runs_say_how_each_task_was_timed(bench, tmp_path):
    import json

    base = {"model": "m", "samples": 10, "machine": "x"}
    caption_rows = [dict(r, task="caption", metric="CIDEr-D") for r in rows_for(1, 1.1)]
    runs = {"snli.json": ({**base, "command": "a"}, rows_for(1, 2.2)),  # timed before --repeats existed
            "caption.json": ({**base, "command": "b", "repeats": 2}, caption_rows)}
    for name, (setting, rows) in runs.items():
        (tmp_path / name).write_text(json.dumps({"setting": setting, "rows": rows}))
    bench.main(["--from-json", str(tmp_path / "snli.json"), str(tmp_path / "caption.json"),
                "--out-dir", str(tmp_path / "out"), "--markdown", str(tmp_path / "B.md")])
    text = (tmp_path / "B.md").read_text()
    assert ("(snli_ve: each setting timed once; full depth at the start and the end of each sweep, the faster kept; "
            "caption: every setting timed in 2 interleaved rounds") in text


def test_profile_decoding_alternates_full_depth_and_mue_and_prints_operators(tmp_path, tmp_path_factory, capsys):
    import sys

    from tiny_checkpoint import LAYERS, tiny_checkpoint

    tiny = tiny_checkpoint("caption", tmp_path_factory)
    sys.path.insert(0, str(SCRIPT.parent))
    import profile_decoding

    common = ["--work-dir", str(tiny.data_dir.parent), "--bpe-dir", tiny.bpe_dir, "--checkpoint",
              str(tiny.checkpoint), "--max-samples", "2", "--batch-size", "2"]
    with pytest.raises(SystemExit):  # a threshold outside [0, 1] is refused before anything loads
        profile_decoding.main(common + ["--threshold", "1.5"])
    records = profile_decoding.main(common + ["--threshold", "0.5", "--passes", "2", "--profile"])["passes"]
    assert [r["setting"] for r in records] == ["full depth", "MuE 0.5"] * 2
    full = records[0]["layers"]
    assert (full["image"], full["text"], full["decoder"]) == (LAYERS, LAYERS, LAYERS)
    assert records[0]["quality"] == records[2]["quality"] and records[1]["quality"] == records[3]["quality"]
    printed = capsys.readouterr().out
    assert "full depth, batch 2" in printed and "MuE 0.5, batch 2" in printed and "aten::" in printed
    with pytest.raises(SystemExit):
        profile_decoding.main(common + ["--decoder-threshold", "-0.1"])
    run = profile_decoding.main(common + ["--threshold", "1", "--decoder-threshold", "0", "--passes", "1",
                                          "--breakdown", "--step-by-step-kv-too"])
    records = run["passes"]
    assert [r["setting"] for r in records[1:]] == ["MuE image 1.0 / text 1.0 / decoder 0.0",
                                                    "MuE image 1.0 / text 1.0 / decoder 0.0, keys/values step by step"]
    mue = records[1]["layers"]  # the streams keep full depth; every token stops after its first layer
    assert (mue["image"], mue["text"], mue["decoder"]) == (LAYERS, LAYERS, 1.0)
    # Deferring the skipped layers' keys/values changes no output.
    assert records[2]["quality"] == records[1]["quality"] and records[2]["layers"] == mue
    full, exits, step_by_step = (run["breakdowns"][r["setting"]] for r in records)
    for parts in (full, exits, step_by_step):  # every component was found, none counted inside another
        assert all(parts[name] > 0 for name in parts if name != "generator loop and the rest")
        assert 0 <= parts["generator loop and the rest"] < parts["generation"]
    assert "| output head (vocabulary projection) |" in capsys.readouterr().out


def test_box_iou_by_hand(bench):
    assert bench.box_iou((0, 0, 2, 2), (0, 0, 2, 2)) == 1.0
    assert bench.box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # 1 / (4 + 4 - 1)
    assert bench.box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def _grading_data(tmp_path):
    from data_utils.synthetic_vqa_grounding import build_vqa_grounding_task

    build_vqa_grounding_task(str(tmp_path), seed=2, num_train=6, num_valid=1, num_test=4)
    return tmp_path


class _Result:
    def __init__(self, predictions):
        self.predictions = predictions


class _Stats:
    def __init__(self, positions):
        self.positions = positions

    def __len__(self):
        return 1

    def decoder_by_position(self):
        return {"mean": self.positions}


def test_vqa_grading_scores_levels_baselines_and_changed_answers(bench, tmp_path):
    data = _grading_data(tmp_path)
    test = data / "vqa_gen_test.tsv"
    grading = bench.VGGrading("vqa_gen_allcand", test, test)
    rows = bench._tsv_rows(test)
    right = _Result([{"question_id": int(r[0]), "answer": r[3].split("|!+")[1]} for r in rows])
    wrong = _Result([{"question_id": int(r[0]), "answer": "no such answer"} for r in rows])
    full, other = grading.row_extras(right, _Stats([])), grading.row_extras(wrong, _Stats([]))
    assert set(full["quality_by_level"].values()) == {100.0} and set(other["quality_by_level"].values()) == {0.0}
    grading.compare_with_full_depth(other, full)
    assert other["changed_vs_full_depth"] == 100.0
    # the most frequent training answer, scored by hand on the test rows
    from collections import Counter

    answers = [r[3].split("|!+")[1] for r in bench._tsv_rows(data / "vqa_gen_train.tsv")]
    frequent = Counter(answers).most_common(1)[0][0]
    by_hand = 100.0 * sum(r[3].split("|!+")[1] == frequent for r in rows) / len(rows)
    assert grading.baselines[f"most frequent answer ({frequent!r})"] == pytest.approx(by_hand)


def test_grounding_grading_iou_cost_and_depth_per_box_token(bench, tmp_path):
    data = _grading_data(tmp_path)
    test = data / "refcoco_test.tsv"
    grading = bench.VGGrading("refcoco", test, test)
    rows = bench._tsv_rows(test)
    boxes = {r[0]: [float(v) for v in r[3].split(",")] for r in rows}
    exact = _Result([{"uniq_id": k, "box": b} for k, b in boxes.items()])
    # each box shifted right by its own width: IoU 0 with the reference
    shifted = _Result([{"uniq_id": k, "box": [b[2], b[1], 2 * b[2] - b[0], b[3]]} for k, b in boxes.items()])
    full = grading.row_extras(exact, _Stats([6.0, 5.0, 4.0, 3.0, 2.0]))
    early = grading.row_extras(shifted, _Stats([1.0, 1.0, 2.0, 2.0, 1.0]))
    grading.compare_with_full_depth(early, full)
    assert full["mean_iou"] == 1.0 and early["mean_iou"] == 0.0 and early["iou_cost"] == 1.0
    assert early["iou_with_full_depth_box"] == 0.0 and early["changed_vs_full_depth"] == 100.0
    assert full["decoder_layers_by_position"] == {"x0": 6.0, "y0": 5.0, "x1": 4.0, "y1": 3.0, "eos": 2.0}
    assert len(grading.baselines) == 1 and 0.0 <= next(iter(grading.baselines.values())) <= 100.0


def test_reuse_checkpoints_refuses_a_missing_model(bench, tmp_path):
    args = argparse.Namespace(pretrain_backbone_steps=0, updates=7, reuse_checkpoints=True, train_batch_size=4,
                              finetune_from_model=None, freeze_encoder_layers_updates=0)
    with pytest.raises(FileNotFoundError, match="--reuse-checkpoints: no trained refcoco model"):
        bench.vg_train("refcoco", tmp_path, tmp_path, "bpe", args)


def test_unknown_task_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tasks", "vqa"])


def test_vqa_grounding_training_goes_through_the_run_script(bench, tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append((command, kw["env"])))
    args = argparse.Namespace(pretrain_backbone_steps=0, updates=7, reuse_checkpoints=False, train_batch_size=4,
                              finetune_from_model="/models/vqa.pt", freeze_encoder_layers_updates=0)
    checkpoint = bench.vg_train("refcoco", tmp_path, tmp_path / "data", "bpe", args)
    (command, env), = calls
    assert command[-1].endswith("run_scripts/refcoco/train_refcoco_mue.sh")
    extra = env["extra_args"].split()
    assert extra[extra.index("--finetune-from-model") + 1] == "/models/vqa.pt"
    assert extra[extra.index("--max-update") + 1] == "7" and extra[extra.index("--max-image-size") + 1] == "64"
    assert env["restore_file"] == "" and env["warmup_ratio"] == "0"
    assert extra[extra.index("--total-num-update") + 1] == "7" and extra[extra.index("--warmup-updates") + 1] == "1"
    assert checkpoint.parent.name.startswith("checkpoints_refcoco_7_from_")
    assert (checkpoint.parent / "trained_7_updates").exists()
    checkpoint.write_bytes(b"")  # what the run script would have written: a second run reuses it
    assert bench.vg_train("refcoco", tmp_path, tmp_path / "data", "bpe", args) == checkpoint and len(calls) == 1


def test_vqa_grounding_training_holds_the_encoder_and_keeps_other_levels_apart(bench, tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append((command, kw["env"])))
    args = argparse.Namespace(pretrain_backbone_steps=0, updates=7, reuse_checkpoints=False, train_batch_size=4,
                              finetune_from_model=None, freeze_encoder_layers_updates=3)
    levels_dir = bench.vg_data_dir(tmp_path, (1, 2, 3, 4))
    assert bench.vg_data_dir(tmp_path, (1, 2, 3)).name == "data_vqa_grounding"
    assert levels_dir.name == "data_vqa_grounding_levels_1234"
    checkpoint = bench.vg_train("vqa_gen_allcand", tmp_path, levels_dir, "bpe", args)
    (command, env), = calls
    extra = env["extra_args"].split()
    assert extra[extra.index("--freeze-encoder-layers-updates") + 1] == "3"
    assert env["data"].startswith(str(levels_dir / "vqa_gen_train.tsv"))
    # another level mix or hold is another model: never reused for this one
    assert checkpoint.parent.name == "checkpoints_vqa_gen_7_levels_1234_hold3"


def test_grounding_location_bins_can_span_a_larger_side(bench, tmp_path, monkeypatch):
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, **kw: calls.append((command, kw["env"])))
    args = argparse.Namespace(pretrain_backbone_steps=0, updates=7, reuse_checkpoints=False, train_batch_size=4,
                              finetune_from_model=None, freeze_encoder_layers_updates=0, grounding_max_image_size=512)
    checkpoint = bench.vg_train("refcoco", tmp_path, tmp_path / "data", "bpe", args)
    (command, env), = calls
    extra = env["extra_args"].split()
    assert extra[extra.index("--max-image-size") + 1] == "512" and extra.count("--max-image-size") == 1
    assert checkpoint.parent.name == "checkpoints_refcoco_7_maxsize512"


def test_score_by_level_names_only_the_levels_the_rows_have(bench):
    full = {"quality": 70.0, "trivial_baselines": {}, "quality_by_level": {"1": 60.0, "3": 80.0}}
    summary = {"batches": {1: {"full": full, "static_half": None, "mue_best": None}}}
    text = "\n".join(bench.vg_markdown("vqa_gen_allcand", summary, []))
    assert "Score by level (1 colour / yes-no, 3 how many of a colour), batch 1: full depth 60.0 / 80.0." in text
