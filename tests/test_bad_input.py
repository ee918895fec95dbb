"""Bad input is named before work starts: checkpoints, task options that do not fit the model, exit
options the chosen policy ignores. (Bad TSV rows, BPE dirs and thresholds: tests/test_data.py,
tests/test_tasks.py, tests/test_mue_inference.py.)"""
import os
import subprocess
import sys

import pytest
import torch

from mue_fairseq.exits.config import mue_overrides
from mue_fairseq.ofa.checkpoint import OFA_ARCHITECTURES, check_is_ofa_checkpoint, read_checkpoint
from mue_fairseq.tasks.ofa_task import patch_grid_side
from ofa_fixtures import BPE_DIR, REPO, SHARED, require_file

HOLDOUT = SHARED / "ofa_reference" / "ofa_tiny_holdout.pt"  # caption, trained at 320 px, 24 image buckets
CAPTION_TSV = SHARED / "ofa_cli" / "caption_test.tsv"


def test_truncated_checkpoint_is_named(tmp_path):
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(require_file(HOLDOUT).read_bytes()[:10_000_000])
    with pytest.raises(ValueError, match=r"cut\.pt: truncated or corrupt checkpoint"):
        read_checkpoint(str(truncated))


def test_torch_file_that_is_not_a_checkpoint_is_named(tmp_path):
    other = tmp_path / "tensors.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"tensors\.pt: not an OFA checkpoint"):
        read_checkpoint(str(other))
    no_cfg = tmp_path / "no_cfg.pt"
    state = read_checkpoint(str(require_file(HOLDOUT)))
    with pytest.raises(ValueError, match=r"no_cfg\.pt: not an OFA checkpoint: no 'model' entry"):
        check_is_ofa_checkpoint(str(no_cfg), {"cfg": state["cfg"]}, OFA_ARCHITECTURES)


def test_tsv_passed_as_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"caption_test\.tsv: not a torch checkpoint file"):
        read_checkpoint(str(require_file(CAPTION_TSV)))
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        read_checkpoint(str(tmp_path / "nowhere.pt"))


@pytest.mark.parametrize("side", [64, 100, 320, 330, 480])
def test_patch_grid_side_is_the_resnets(side):
    from mue_fairseq.ofa.resnet import ResNet

    resnet = ResNet([1, 1, 1]).eval()
    with torch.no_grad():
        features = resnet(torch.zeros(1, 3, side, side))
    assert features.shape[-2:] == (patch_grid_side(side), patch_grid_side(side))


def test_fairseq_generate_names_an_image_size_the_checkpoint_cannot_take(tmp_path):
    """fairseq-generate takes task options from the command line: the default 480 px does not fit
    a checkpoint whose image position table holds 24x24 patches (384 px)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "fairseq_cli.generate", str(require_file(CAPTION_TSV)), "--path", str(HOLDOUT),
            "--user-dir", str(REPO / "mue_fairseq"), "--task", "caption", "--bpe-dir", str(BPE_DIR),
            "--selected-cols", "1,4,2", "--gen-subset", "test", "--batch-size", "4", "--cpu", "--beam", "1"]
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--patch-image-size 480 gives a 30x30 grid" in proc.stderr
    assert "at most 384 px" in proc.stderr
    assert "IndexError" not in proc.stderr


@pytest.mark.parametrize("options, named", [
    (dict(mue_static_decoder_layers=1), "--mue-exit-policy similarity ignores --mue-static-decoder-layers"),
    (dict(mue_static_image_layers=2), "ignores --mue-static-image-layers"),
    (dict(mue_exit_policy="static", mue_decoder_threshold=0.9), "static ignores --mue-decoder-threshold"),
    (dict(mue_exit_policy="entropy", mue_patience=2), "entropy ignores --mue-patience (used by --mue-exit-policy patience)"),
])
def test_exit_option_the_policy_ignores_is_an_error(options, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        mue_overrides(**options)


def test_exit_options_the_policy_uses_pass():
    assert mue_overrides(mue_exit_policy="static", mue_static_decoder_layers=2)["mue_static_decoder_layers"] == 2
    assert mue_overrides(mue_exit_policy="entropy", mue_static_image_layers=3, mue_entropy_threshold=0.5)
    # Defaults ask for nothing, so naming them is harmless.
    assert mue_overrides(mue_exit_policy="static", mue_decoder_threshold=1.0)


# ----------------------------------------------------------------------------- evaluation results


def _evaluate(tmp_path, results, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    overrides = {"data": str(CAPTION_TSV), "bpe_dir": str(BPE_DIR), "selected_cols": "1,4,2"}
    args = [sys.executable, "-m", "mue_fairseq.cli.evaluate", str(require_file(CAPTION_TSV)), "--path", str(HOLDOUT),
            "--user-dir", str(REPO / "mue_fairseq"), "--task", "caption", "--gen-subset", "test", "--batch-size", "4",
            "--required-batch-size-multiple", "1", "--cpu", "--beam", "1", "--max-len-b", "4",
            "--results-path", str(results), "--model-overrides", repr(overrides), *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_results_path_that_is_a_file_is_refused_before_the_model_loads(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for target in (blocker, blocker / "inside"):
        proc = _evaluate(tmp_path, target)
        assert proc.returncode != 0
        assert "--results-path" in proc.stderr and "is a file, not a folder" in proc.stderr
        assert "samples" not in proc.stdout  # nothing was evaluated


def test_an_earlier_runs_exit_statistics_do_not_stay_beside_new_results(tmp_path):
    results = tmp_path / "results"
    first = _evaluate(tmp_path, results, "--mue-image-threshold", "0.9", "--mue-text-threshold", "0.9")
    assert first.returncode == 0, first.stderr[-2000:]
    assert (results / "test_exit_stats.json").exists()
    assert list(results.glob("test_exit_stats.*_exits.png"))
    second = _evaluate(tmp_path, results)  # no exits this time
    assert second.returncode == 0, second.stderr[-2000:]
    assert not (results / "test_exit_stats.json").exists()
    assert not list(results.glob("test_exit_stats.*_exits.png"))
    assert "left by an earlier run" in second.stdout + second.stderr
    wrote = [line for line in second.stdout.splitlines() if "| wrote " in line]
    assert wrote and "exit_stats" not in wrote[-1]
    assert not list(results.glob(".*.tmp"))


def test_task_other_than_the_checkpoints_is_named(tmp_path):
    proc = _evaluate(tmp_path, tmp_path / "results", "--task", "snli_ve")
    assert proc.returncode != 0
    assert "--task snli_ve but the checkpoint" in proc.stderr and "trained for 'caption'" in proc.stderr


# ----------------------------------------------------------------------------- images and texts


def _caption_rows():
    import csv

    csv.field_size_limit(1 << 30)
    with open(require_file(CAPTION_TSV), newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t"))


def _write_rows(path, rows):
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _truncated_tsv(tmp_path):
    rows = _caption_rows()
    image = rows[1][4]
    rows[1][4] = image[: len(image) // 3 // 4 * 4]  # base64 cut on a 4-character boundary: 2/3 of the PNG gone
    return _write_rows(tmp_path / "truncated.tsv", rows)


def _evaluate_tsv(tmp_path, tsv, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    overrides = {"data": str(tsv), "bpe_dir": str(BPE_DIR), "selected_cols": "1,4,2"}
    args = [sys.executable, "-m", "mue_fairseq.cli.evaluate", str(tsv), "--path", str(require_file(HOLDOUT)),
            "--user-dir", str(REPO / "mue_fairseq"), "--task", "caption", "--gen-subset", "test", "--batch-size", "4",
            "--required-batch-size-multiple", "1", "--cpu", "--beam", "1", "--max-len-b", "4",
            "--results-path", str(tmp_path / "results"), "--model-overrides", repr(overrides), *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_truncated_image_is_named_counted_and_kept_as_ofa_does(tmp_path):
    import json

    proc = _evaluate_tsv(tmp_path, _truncated_tsv(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "row 1002 (" in log and "truncated.tsv, line 2): image is truncated" in log
    scores = json.loads((tmp_path / "results" / "test_scores.json").read_text())
    assert scores["truncated_images"] == 1 and scores["truncated_image_rows"][0].startswith("1002 (")
    assert len(json.loads((tmp_path / "results" / "test_predict.json").read_text())) == 8  # the row still counts


def test_strict_images_makes_a_truncated_image_an_error(tmp_path):
    proc = _evaluate_tsv(tmp_path, _truncated_tsv(tmp_path), "--strict-images")
    assert proc.returncode != 0
    assert "row 1002 (" in proc.stderr and "image is truncated" in proc.stderr and "--strict-images" in proc.stderr
    assert not (tmp_path / "results" / "test_predict.json").exists()


def test_empty_training_caption_is_named(tmp_path, caplog):
    from mue_fairseq.data.caption_dataset import CaptionDataset
    from mue_fairseq.data.ofa_bpe import build_gpt2_bpe, load_ofa_dictionary
    from mue_fairseq.data.tsv_file import TSVFile

    rows = [[row[0], row[1], ",", row[3], row[4]] if i == 2 else row for i, row in enumerate(_caption_rows()[:4])]
    path = _write_rows(tmp_path / "train.tsv", rows)
    dictionary = load_ofa_dictionary(str(BPE_DIR))
    dataset = CaptionDataset("train", TSVFile(str(path), "0,4,2"), build_gpt2_bpe(str(BPE_DIR)), dictionary,
                             dictionary, patch_image_size=64)
    with caplog.at_level("WARNING"):
        for index in range(len(dataset)):
            dataset[index]
        dataset[2]  # named once per row
    empty = [r.getMessage() for r in caplog.records if "empty caption" in r.getMessage()]
    assert len(empty) == 1 and "row 2 (" in empty[0] and "train.tsv, line 3" in empty[0]
