"""The stage-2 benchmark's commands and report (no training or timing here)."""
import argparse
import csv
import json
from pathlib import Path

import pytest

from ofa_fixtures import BPE_DIR, REFERENCE_DIR, require_file
from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_stage2.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT)


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


# --------------------------------------------------------------------------- a given stage-1 checkpoint
OFA_CAPTION = REFERENCE_DIR / "ofa_tiny_caption.pt"  # made by OFA's train.py: 32-d, 2+2 layers, 16 image buckets


def stage2_args(bpe_dir):
    return argparse.Namespace(bpe_dir=str(bpe_dir), scst_args='{"beam":5,"max_len_b":16}', stage2_lr=1e-4,
                              stage2_updates=4, stage2_batch_size=2)


def test_stage2_model_is_the_given_checkpoints(bench, tmp_path):
    """The stage-2 command built from a checkpoint's saved config gives a model of its sizes, into
    which its weights load strictly (as --restore-file then does)."""
    from fairseq import tasks

    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.cli.train import parse_train_args
    from mue_fairseq.ofa.checkpoint import read_checkpoint

    checkpoint = require_file(OFA_CAPTION)
    build_synthetic_task(str(tmp_path), seed=5, num_train=4, num_valid=2, num_test=1)
    model_args, criterion = bench.checkpoint_model_args(checkpoint)
    assert criterion == "adjust_label_smoothed_cross_entropy"
    assert model_args[:2] == ["--arch", "mue_ofa_tiny"] and model_args[-2:] == ["--dropout", "0.0"]
    command = bench.stage2_command(tmp_path, checkpoint, tmp_path / "scst", "scst", stage2_args(BPE_DIR), {},
                                   model_args)
    _, cfg = parse_train_args(command[3:])
    state = read_checkpoint(str(checkpoint))
    saved = state["cfg"]["model"]
    # not the built-in stage 1's sizes (128-d, 6+6 layers, 8 image buckets) nor mue_ofa_tiny's defaults
    assert (cfg.model.encoder_embed_dim, cfg.model.encoder_ffn_embed_dim, cfg.model.decoder_layers,
            cfg.model.image_bucket_size) == (32, 128, 2, 16)
    for name in bench.SHAPE_VALUES + bench.SHAPE_FLAGS:
        if getattr(saved, name, None) is not None:
            assert getattr(cfg.model, name) == getattr(saved, name), name
    assert cfg.task.patch_image_size == state["cfg"]["task"]["patch_image_size"]
    assert cfg.model.dropout == 0.0 and cfg.checkpoint.restore_file == str(checkpoint)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)


def test_a_saved_config_a_command_line_cannot_repeat_is_an_error(bench):
    from mue_fairseq.ofa.checkpoint import allow_fairseq_checkpoint_globals, read_checkpoint

    allow_fairseq_checkpoint_globals()
    state = read_checkpoint(str(require_file(OFA_CAPTION)))
    model = argparse.Namespace(**vars(state["cfg"]["model"]))
    model.share_all_embeddings = False  # mue_ofa_tiny turns it on; there is no --no-share-all-embeddings
    with pytest.raises(ValueError, match=r"given\.pt: share_all_embeddings is off in the saved config, but "
                                         r"architecture mue_ofa_tiny turns it on"):
        bench.model_args_from_state({"cfg": {"model": model, "task": state["cfg"]["task"]}}, "given.pt")
    model.arch = model._name = "transformer"
    with pytest.raises(ValueError, match=r"given\.pt: architecture 'transformer' is not an OFA model"):
        bench.model_args_from_state({"cfg": {"model": model, "task": state["cfg"]["task"]}}, "given.pt")


@pytest.mark.parametrize("problem", ["no checkpoint", "no data files", "no data dir"])
def test_a_missing_stage1_checkpoint_or_data_is_named(bench, tmp_path, capsys, problem):
    checkpoint, data = tmp_path / "stage1.pt", tmp_path / "data"
    data.mkdir()
    if problem != "no checkpoint":
        checkpoint.write_bytes(b"")
    argv = ["--stage1-checkpoint", str(checkpoint), "--data-dir", str(data), "--name", "given",
            "--work-dir", str(tmp_path / "work"), "--bpe-dir", str(require_file(BPE_DIR))]
    if problem == "no data dir":
        argv = argv[:2] + argv[4:]
    with pytest.raises(SystemExit):
        bench.main(argv)
    error = capsys.readouterr().err
    expected = {
        "no checkpoint": f"--stage1-checkpoint: no checkpoint {checkpoint}",
        "no data files": f"--data-dir {data}: no caption_stage2_train.tsv, caption_valid.tsv, caption_test.tsv, "
                         "cider_cached_tokens/coco-train-words.p",
        "no data dir": "--stage1-checkpoint and --data-dir go together"}[problem]
    assert expected in error
    assert not (tmp_path / "work").exists()


def test_named_report_files_and_stage1_title(bench, tmp_path):
    results = {"models": {"stage1": evaluation([10.0, 20.0], 19.0, 1.2)},
               "titles": {"stage1": "stage 1 (given checkpoint, mue_layerwise_ce)"}, "title": "from somewhere"}
    bench.write_outputs(results, tmp_path, "stage2_journey")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "stage2_journey.csv", "stage2_journey.json", "stage2_journey.md", "stage2_journey_depth.png"]
    table = (tmp_path / "stage2_journey.md").read_text()
    assert "| stage 1 (given checkpoint, mue_layerwise_ce) | 10.00 | 20.00 |" in table
