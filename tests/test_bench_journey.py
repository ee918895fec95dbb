"""The journey benchmark's pieces that need no peer environment: calibration targets, the runs it
times and its argument checks (no timing here)."""
from pathlib import Path

import pytest

from script_modules import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_journey.py"


@pytest.fixture(scope="module")
def journey():
    return load_script(SCRIPT)


def test_targets_are_fractions_of_the_start_quality(journey):
    assert journey.target_name(0.99) == "mue99" and journey.target_name(0.96) == "mue96"
    wanted = journey.calibration_targets(120.0, [0.99, 0.96])
    assert wanted == pytest.approx({"mue99": 118.8, "mue96": 115.2})
    with pytest.raises(ValueError, match="reference quality"):
        journey.calibration_targets(0.0, [0.96])


def test_runs_compare_the_start_with_the_tuned_checkpoint_at_each_target(journey):
    thresholds = {"mue99": {"mue_image_threshold": 1.0, "mue_text_threshold": 0.95, "mue_decoder_threshold": 0.9},
                  "mue96": {"mue_image_threshold": 0.9, "mue_text_threshold": 0.9, "mue_decoder_threshold": 0.8}}
    runs = {name: rest for name, *rest in journey.configurations([0.99, 0.96], thresholds, [1, 16], authors=True)}
    # the reference: OFA's evaluate.py on the start at its batch size, no MuE options
    assert runs["ofa_start_b16"] == ["ofa", 16, None, "start"]
    assert runs["ours_start_full_b16"] == ["ours", 16, {}, "start"]
    assert runs["ours_tuned_full_b16"][2] == journey.FULL_DEPTH
    assert runs["ours_tuned_mue96_b1"] == ["ours", 1, thresholds["mue96"], "tuned"]
    assert runs["ours_tuned_mue99_b16"] == ["ours", 16, thresholds["mue99"], "tuned"]
    # the authors' code takes (image, text, decoder) at their batch size 1
    assert runs["authors_tuned_mue96_b1"] == ["authors", 1, (0.9, 0.9, 0.8), "tuned"]
    assert len(runs) == 3 + 2 * 3
    without = [c[0] for c in journey.configurations([0.96], thresholds, [16], authors=False)]
    assert without == ["ofa_start_b16", "ours_start_full_b16", "ours_tuned_full_b16", "ours_tuned_mue96_b16"]


@pytest.mark.parametrize("argv, message", [
    (["--targets", "1.2"], "--targets must be fractions"),
    (["--targets", "0.961", "0.958"], "differ in whole percent"),
    (["--repeats", "0"], "--repeats"),
    (["--redo", "everything"], "invalid choice"),
])
def test_bad_arguments_are_refused(journey, capsys, argv, message):
    with pytest.raises(SystemExit):
        journey.parse_args(argv)
    assert message in capsys.readouterr().err


def test_verdict_names_runs_that_miss_the_target(journey):
    rows = [{"run": "ours_tuned_mue96_b16", "wall_s": 1.0, "speedup_vs_ofa": 1.62, "of_start_cider": 0.97},
            {"run": "ours_tuned_mue96_b1", "wall_s": 2.0, "speedup_vs_ofa": 1.1, "of_start_cider": 0.965},
            {"run": "ours_tuned_mue99_b16", "wall_s": 1.0, "speedup_vs_ofa": 2.0, "of_start_cider": 0.99}]
    lines = journey.verdict(rows, [0.96])
    assert len(lines) == 2
    assert "1.62x OFA" in lines[0] and "(met" in lines[0]
    assert "1.10x OFA" in lines[1] and "(missed" in lines[1]


def test_finetuning_is_scheduled_in_updates_through_the_run_script(journey, tmp_path, monkeypatch):
    """The run script schedules by --warmup-ratio over --max-epoch; the journey's fine-tuning is
    counted in updates, so it turns the ratio off and gives total and warm-up updates itself."""
    import argparse
    import os
    import shlex
    import subprocess

    calls = []
    monkeypatch.setattr(journey, "run_logged", lambda command, log, env: calls.append((command, env)))
    args = argparse.Namespace(redo=["finetune"], finetune_updates=200, finetune_lr=5e-4, bpe_dir="bpe",
                              master_port=1234)
    data = tmp_path / "data"
    data.mkdir()
    journey.finetune(args, tmp_path, tmp_path / "start.pt", data)
    (command, env), = calls
    dry = subprocess.run([str(c) for c in command], env={**os.environ, **env, "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True)
    argv = shlex.split(dry.stdout.strip().splitlines()[-1])
    assert "--warmup-ratio=0" in argv
    assert argv[argv.index("--total-num-update") + 1] == "200" and argv[argv.index("--warmup-updates") + 1] == "20"
    assert argv[argv.index("--max-update") + 1] == "200" and "--restore-file=" + str(tmp_path / "start.pt") in argv
