"""The stage-2 benchmark's commands and report (no training or timing here)."""
import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest

from ofa_fixtures import BPE_DIR, require_file

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stage2.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_stage2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage2_commands_parse_as_ofa_train_command_lines(bench, tmp_path):
    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.cli.train import parse_train_args

    build_synthetic_task(str(tmp_path), seed=5, num_train=4, num_valid=2, num_test=1)
    args = argparse.Namespace(
        bpe_dir=str(require_file(BPE_DIR)), scst_args='{"beam":5,"max_len_b":16}', stage2_lr=1e-4,
        stage2_updates=30, stage2_batch_size=8)
    thresholds = {"mue_decoder_threshold": 0.9, "mue_image_threshold": 0.8}
    parsed = {}
    for variant in bench.VARIANTS:
        command = bench.stage2_command(tmp_path, tmp_path / "stage1.pt", tmp_path / variant, variant, args, thresholds)
        assert command[1:3] == ["-m", "mue_fairseq.cli.train"]
        _, cfg = parse_train_args(command[3:])
        parsed[variant] = cfg
    for cfg in parsed.values():  # the same training but for the loss
        assert cfg.optimization.max_update == 30 and cfg.dataset.batch_size == 8 and cfg.task.scst
        assert cfg.checkpoint.restore_file == str(tmp_path / "stage1.pt") and cfg.model.dropout == 0.0
        assert cfg.lr_scheduler.total_num_update == 30 and cfg.lr_scheduler.warmup_updates == 3
    assert parsed["scst"].criterion._name == "scst_reward_criterion"
    assert parsed["layerwise_scst"].criterion._name == "mue_layerwise_scst"
    assert not parsed["layerwise_scst"].criterion.sample_with_exits
    exits = parsed["layerwise_scst_exits"]
    assert exits.criterion.sample_with_exits
    assert (exits.model.mue_decoder_threshold, exits.model.mue_image_threshold) == (0.9, 0.8)
    assert parsed["scst"].model.mue_decoder_threshold == 1.0  # only the exiting variant samples with exits


def test_exiting_samples_use_the_stage1_calibration_or_a_decoder_exit(bench):
    calibrated = {"calibrated_is_full_depth": False, "calibrated_thresholds": {
        "mue_image_threshold": 1.0, "mue_text_threshold": 0.9, "mue_decoder_threshold": 0.8}}
    assert bench.exit_thresholds(calibrated) == {"mue_text_threshold": 0.9, "mue_decoder_threshold": 0.8}
    full = {"calibrated_is_full_depth": True, "calibrated_thresholds": dict.fromkeys(calibrated["calibrated_thresholds"], 1.0)}
    assert bench.exit_thresholds(full) == {"mue_decoder_threshold": 0.9}


def evaluation(depth_ciders, exit_cider, speedup):
    return {"decoder_layers": len(depth_ciders), "cider_by_decoder_depth": dict(enumerate(depth_ciders, start=1)),
            "full_depth_cider": depth_ciders[-1], "exit_cider": exit_cider,
            "calibrated_thresholds": {"mue_image_threshold": 1.0, "mue_text_threshold": 0.9,
                                      "mue_decoder_threshold": 0.8},
            "mean_exit_layers": {"image": 2.0, "text": 3.0, "decoder": 1.5}, "full_seconds": 2.0,
            "exit_seconds": 2.0 / speedup, "measured_speedup": speedup}


def test_report_has_every_model_and_depth(bench, tmp_path):
    results = {"models": {"stage1": evaluation([10.0, 20.0, 30.0], 29.0, 1.25),
                          "scst": evaluation([5.0, 15.0, 40.0], 39.0, 1.1)}}
    bench.write_outputs(results, tmp_path)
    table = (tmp_path / "stage2.md").read_text()
    assert "| stage 1 (mue_layerwise_ce) | 10.00 | 20.00 | 30.00 |" in table
    assert "| OFA's SCST (scst_reward_criterion) | 40.00 | 1 / 0.9 / 0.8 | 39.00 |" in table
    assert "| 1.25x |" in table and "| 1.10x |" in table
    rows = list(csv.DictReader((tmp_path / "stage2.csv").open()))
    assert [(r["model"], r["setting"], float(r["cider_d"])) for r in rows if r["model"] == "scst"][:3] == [
        ("scst", "decoder depth 1", 5.0), ("scst", "decoder depth 2", 15.0), ("scst", "decoder depth 3", 40.0)]
    assert json.loads((tmp_path / "stage2.json").read_text())["models"]["scst"]["exit_cider"] == 39.0
    assert (tmp_path / "stage2_depth.png").stat().st_size > 0


def test_skip_training_without_checkpoints_names_the_missing_file(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--work-dir", str(tmp_path), "--skip-training", "--bpe-dir", str(require_file(BPE_DIR))])
    assert f"--skip-training: no checkpoint {tmp_path / 'stage1' / 'checkpoint_last.pt'}" in capsys.readouterr().err
