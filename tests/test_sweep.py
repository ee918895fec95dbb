"""Threshold sweep (mue_fairseq.cli.sweep): Pareto fronts, calibration, and sweeps of a tiny
checkpoint trained in the test session (CSV, plot, calibration re-evaluated with the evaluate CLI)."""
import csv
import json
import shlex
from pathlib import Path

import pytest

from tiny_checkpoint import LAYERS, tiny_checkpoint

from mue_fairseq.cli.sweep import evaluate_command, parse_thresholds
from mue_fairseq.cli.sweep_report import CSV_COLUMNS
from mue_fairseq.exits.selection import SweepPoint, calibrate, meets_target, pareto_front, select_fastest


def point(thresholds, quality, seconds, expected_reduction=0.0):
    return SweepPoint(thresholds=tuple(thresholds), metric="accuracy", quality=quality, num_samples=10,
                      mean_exit_layers={"image": 1.0, "text": 1.0, "decoder": 1.0},
                      expected_reduction_layers=expected_reduction, expected_reduction_flops=None,
                      ideal_speedup_flops=None, seconds=seconds)


# ----------------------------------------------------------------------------- selection
def test_pareto_front_keeps_only_undominated_points_fastest_first():
    full = point((1, 1, 1), 80.0, 10.0)
    fast_bad = point((0.9, 0.9, 0.9), 60.0, 4.0)
    dominated = point((0.95, 1, 1), 70.0, 9.0)  # slower and worse than `middle`
    middle = point((0.9, 1, 1), 79.0, 6.0)
    slow_same = point((1, 0.99, 1), 80.0, 11.0)  # as good as full depth, slower
    front = pareto_front([full, fast_bad, dominated, middle, slow_same], lambda p: p.seconds)
    assert [p.thresholds for p in front] == [fast_bad.thresholds, middle.thresholds, full.thresholds]


def test_calibration_picks_fastest_point_that_keeps_the_target():
    full = point((1, 1, 1), 80.0, 10.0)
    too_lossy = point((0.5, 0.5, 0.5), 70.0, 2.0)
    keeps = point((0.9, 0.9, 0.9), 79.5, 5.0)
    keeps_slower = point((0.95, 0.95, 0.95), 80.0, 7.0)
    points = [full, too_lossy, keeps, keeps_slower]
    assert calibrate(points, full, 0.99).thresholds == keeps.thresholds
    assert calibrate(points, full, 0.8).thresholds == too_lossy.thresholds
    assert calibrate(points, full, 1.0).thresholds == keeps_slower.thresholds
    assert calibrate([full, too_lossy], full, 0.99).thresholds == full.thresholds


def test_calibration_against_another_models_quality():
    # after fine-tuning, the target is a fraction of the starting checkpoint's quality (90), not of
    # the fine-tuned full depth (80)
    full = point((1, 1, 1), 80.0, 10.0)
    fast = point((0.5, 0.5, 0.5), 70.0, 2.0)
    middle = point((0.9, 0.9, 0.9), 77.0, 5.0)
    points = [full, fast, middle]
    assert calibrate(points, full, 0.96).thresholds == middle.thresholds
    assert calibrate(points, full, 0.85, reference_quality=90.0).thresholds == middle.thresholds  # 76.5
    assert calibrate(points, full, 0.75, reference_quality=90.0).thresholds == fast.thresholds  # 67.5
    # nothing keeps 0.99 x 90: full depth, which does not meet it either
    assert calibrate(points, full, 0.99, reference_quality=90.0).thresholds == full.thresholds
    assert not meets_target(full, full, 0.99, reference_quality=90.0)
    assert meets_target(full, full, 0.99)


def test_measured_ties_are_broken_by_expected_time():
    a = point((0.9, 1, 1), 80.0, 5.00, expected_reduction=0.10)
    b = point((1, 0.9, 1), 80.0, 5.05, expected_reduction=0.30)
    c = point((1, 1, 0.9), 80.0, 6.00, expected_reduction=0.60)
    assert select_fastest([a, b, c], time_tolerance=0.0).thresholds == a.thresholds
    assert select_fastest([a, b, c], time_tolerance=0.02).thresholds == b.thresholds  # c is not within 2%


def test_threshold_lists_are_validated():
    assert parse_thresholds("1, 0.95,0.9,0.95", "--image-thresholds") == [1.0, 0.95, 0.9]
    with pytest.raises(ValueError, match="--text-thresholds.*in \\[0, 1\\]"):
        parse_thresholds("1,1.5", "--text-thresholds")
    with pytest.raises(ValueError, match="--decoder-thresholds.*numbers"):
        parse_thresholds("1,high", "--decoder-thresholds")


def test_evaluate_command_drops_sweep_options_and_sets_thresholds():
    argv = ["data.tsv", "--path", "c.pt", "--image-thresholds", "1,0.9", "--text-thresholds=1,0.8", "--calibrate",
            "--target", "0.99", "--reference-quality", "88.5", "--mue-image-threshold", "0.5", "--search", "coordinate",
            "--beam", "5",
            "--model-overrides", "{'bpe_dir': 'x y'}"]
    command = evaluate_command(argv, point((0.9, 0.8, 1.0), 1.0, 1.0))
    assert command == ["python", "-m", "mue_fairseq.cli.evaluate", "data.tsv", "--path", "c.pt", "--beam", "5",
                       "--model-overrides", "{'bpe_dir': 'x y'}", "--mue-image-threshold", "0.9",
                       "--mue-text-threshold", "0.8", "--mue-decoder-threshold", "1.0"]


def test_sweep_refuses_the_authors_preset():
    from types import SimpleNamespace

    from mue_fairseq.cli.sweep import Sweeper
    from mue_fairseq.exits.config import MuEConfig

    model = SimpleNamespace(set_exit_options=None, mue=MuEConfig(mue_preset="authors"))
    with pytest.raises(ValueError, match="without --mue-preset authors"):
        Sweeper([model], task=None, cfg=None, subset="valid")


# ----------------------------------------------------------------------------- on a checkpoint
@pytest.fixture(scope="module")
def snli(tmp_path_factory):
    return tiny_checkpoint("snli_ve", tmp_path_factory)


def read_csv(path: Path):
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_grid_sweep_and_calibration_on_a_trained_checkpoint(snli, tmp_path, capsys):
    from mue_fairseq.cli import evaluate, sweep

    out = tmp_path / "sweep"
    argv = [*snli.eval_args(), "--results-path", str(out), "--image-thresholds", "1,0.3",
            "--text-thresholds", "1,0.3", "--decoder-thresholds", "1,0.3", "--calibrate", "--target", "0.9",
            "--warmup-batches", "1"]
    output = sweep.cli_main(argv)

    columns, rows = read_csv(out / "valid_sweep.csv")
    assert tuple(columns) == CSV_COLUMNS
    assert len(rows) == 8
    assert {(r["image_threshold"], r["text_threshold"], r["decoder_threshold"]) for r in rows} == {
        (i, t, d) for i in ("1.0", "0.3") for t in ("1.0", "0.3") for d in ("1.0", "0.3")}
    full, *others = rows
    assert full["full_depth"] == "1" and float(full["measured_speedup"]) == 1.0
    assert float(full["expected_reduction_layers"]) == 0.0
    assert full["expected_reduction_flops"] == ""  # SNLI-VE scoring has no FLOP model (generation only)
    assert all(float(full[f"{s}_layers"]) == LAYERS for s in ("image", "text", "decoder"))
    for row in rows:
        assert float(row["seconds"]) > 0 and int(row["num_samples"]) == 12
        assert float(row["measured_speedup"]) == pytest.approx(float(full["seconds"]) / float(row["seconds"]))
    # thresholds are changed in place between points: a low threshold stops streams early
    lowest = next(r for r in rows if r["image_threshold"] == r["text_threshold"] == r["decoder_threshold"] == "0.3")
    assert float(lowest["image_layers"]) < LAYERS and float(lowest["text_layers"]) < LAYERS
    assert float(lowest["decoder_layers"]) < LAYERS
    assert float(lowest["expected_reduction_layers"]) > 0
    assert any(r["pareto_measured"] == "1" for r in rows) and any(r["pareto_expected"] == "1" for r in rows)

    png = (out / "valid_sweep_pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    calibration = json.loads((out / "valid_calibration.json").read_text())
    chosen = output["chosen"]
    assert calibration["thresholds"] == chosen.as_options()
    assert calibration["quality"] >= 0.9 * calibration["full_depth_quality"]
    feasible = [r for r in rows if r["meets_target"] == "1"]
    assert min(float(r["seconds"]) for r in feasible) * 1.02 >= calibration["seconds"]
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == calibration["evaluate_command"]

    # re-evaluate the chosen thresholds with the printed evaluate command, on the same split
    command = shlex.split(printed)
    assert command[:3] == ["python", "-m", "mue_fairseq.cli.evaluate"]
    for option, value in calibration["thresholds"].items():
        flag = "--" + option.replace("_", "-")
        assert float(command[command.index(flag) + 1]) == value
    assert "--image-thresholds" not in command and "--calibrate" not in command
    result = evaluate.cli_main(command[3:] + ["--no-plots", "--results-path", str(tmp_path / "reeval")])
    assert result.quality() == pytest.approx(calibration["quality"])
    assert result.quality() >= 0.9 * calibration["full_depth_quality"]


def test_coordinate_search_moves_one_stream_at_a_time(snli, tmp_path):
    from mue_fairseq.cli import sweep

    out = tmp_path / "coordinate"
    argv = [*snli.eval_args(), "--results-path", str(out), "--search", "coordinate", "--rounds", "1",
            "--image-thresholds", "0.3", "--text-thresholds", "0.3", "--decoder-thresholds", "0.3",
            "--target", "0.5", "--warmup-batches", "0"]
    output = sweep.cli_main(argv)
    _, rows = read_csv(out / "valid_sweep.csv")
    evaluated = [tuple(float(r[f"{s}_threshold"]) for s in ("image", "text", "decoder")) for r in rows]
    assert evaluated[0] == (1.0, 1.0, 1.0)
    # each step changes one stream from the current setting: never the whole grid (8 points)
    assert 2 <= len(rows) <= 4
    for thresholds in evaluated[1:]:
        assert sum(value != 1.0 for value in thresholds) >= 1
    assert output["chosen"] is None and (out / "valid_sweep_pareto.png").exists()
    assert not (out / "valid_calibration.json").exists()


def test_caption_sweep_generates_with_exits(tmp_path, tmp_path_factory):
    from mue_fairseq.cli import sweep

    caption = tiny_checkpoint("caption", tmp_path_factory)
    out = tmp_path / "caption"
    argv = [*caption.eval_args(), "--results-path", str(out), "--beam", "2", "--max-len-b", "6",
            "--image-thresholds", "1", "--text-thresholds", "1", "--decoder-thresholds", "1,0.3",
            "--warmup-batches", "1", "--calibrate", "--target", "0.5"]
    output = sweep.cli_main(argv)
    _, rows = read_csv(out / "valid_sweep.csv")
    assert [r["decoder_threshold"] for r in rows] == ["1.0", "0.3"]
    assert {r["metric"] for r in rows} == {"cider_d"} and all(int(r["num_samples"]) == 6 for r in rows)
    assert float(rows[0]["decoder_layers"]) == LAYERS and float(rows[1]["decoder_layers"]) < LAYERS
    assert output["chosen"].quality >= 0.5 * output["reference"].quality
