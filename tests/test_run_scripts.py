"""run_scripts/{caption,snli_ve}/*_mue.sh: syntax, the commands they build (DRY_RUN=1) on CPU and
GPU machines, and the evaluate and sweep scripts run end to end on a tiny trained checkpoint."""
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_checkpoint import tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "run_scripts"
MUE_SCRIPTS = sorted(SCRIPTS.glob("*/*_mue.sh"))
BASH = shutil.which("bash") or "/bin/bash"


def run_script(script: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    full_env.update({"OMP_NUM_THREADS": "1", **env})
    result = subprocess.run([BASH, str(script), *args], env=full_env, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"{script.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def dry_run(script: Path, env: dict, *args: str) -> list:
    """The command a script would run, as argv."""
    lines = run_script(script, {"DRY_RUN": "1", **env}, *args).stdout.strip().splitlines()
    assert len(lines) == 1, lines
    return shlex.split(lines[0])


def option(command: list, name: str) -> str:
    values = [token.split("=", 1)[1] for token in command if token.startswith(name + "=")]
    assert len(values) == 1, f"{name} appears {len(values)} times in {command}"
    return values[0]


def fake_gpu_path(tmp_path: Path, num_gpus: int) -> str:
    """A PATH whose nvidia-smi lists `num_gpus` GPUs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    lines = "\n".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'" for i in range(num_gpus))
    smi.write_text(f"#!/bin/sh\n{lines}\n")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def no_gpu_path(tmp_path: Path) -> str:
    """A PATH without nvidia-smi (whatever this machine has)."""
    bin_dir = tmp_path / "nogpu"
    bin_dir.mkdir()
    for tool in ("grep", "awk", "tr", "dirname", "mkdir", "tee", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def write_rows(path: Path, count: int) -> Path:
    path.write_text("".join(f"{i}\trow\n" for i in range(count)))
    return path


# ----------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("script", [SCRIPTS / "mue_common.sh", *MUE_SCRIPTS], ids=lambda p: p.name)
def test_scripts_parse(script):
    assert len(MUE_SCRIPTS) == 7
    result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("task", ["snli_ve", "caption"])
def test_train_script_cpu_processes_and_updates(task, tmp_path):
    script = SCRIPTS / task / f"train_{task}_mue.sh"
    data = f"{write_rows(tmp_path / 'train.tsv', 100)},{write_rows(tmp_path / 'valid.tsv', 7)}"
    env = {"PATH": no_gpu_path(tmp_path), "NPROC": "2", "data": data, "batch_size": "4", "update_freq": "1",
           "restore_file": "/ckpt/ofa_base.pt", "save_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
           "extra_args": "--layer-reduction sum"}
    command = dry_run(script, env)
    assert command[:2] == ["env", "MUE_CPU_DISTRIBUTED=1"]  # the plugin's CPU support for torchrun's ranks
    launcher = command.index("torch.distributed.run")
    port = 7061 if task == "snli_ve" else 1061
    assert command[launcher + 1:launcher + 3] == ["--nproc_per_node=2", f"--master_port={port}"]
    module = command.index("fairseq_cli.train")
    assert command[module - 1] == "-m" and command[module + 1] == data  # data: first positional argument
    for flag in ("--cpu", "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--ignore-unused-valid-subsets",
                 "--encoder-normalize-before", "--scale-attn", "--add-type-embedding", "--find-unused-parameters"):
        assert flag in command, flag
    assert "--fp16" not in command
    assert option(command, "--restore-file") == "/ckpt/ofa_base.pt"
    assert option(command, "--arch") == "mue_ofa_base" and option(command, "--criterion") == "mue_layerwise_ce"
    assert option(command, "--user-dir") == str(REPO / "mue_fairseq")
    assert Path(option(command, "--bpe-dir")).resolve() == (REPO.parent / "shared" / "ofa_bpe").resolve()
    # 100 rows / batch 4 = 25 batches, 13 per process, 5 epochs; warmup int(65 * 0.06)
    assert option(command, "--total-num-update") == "65" and option(command, "--warmup-updates") == "3"
    assert command[-2:] == ["--layer-reduction", "sum"]
    if task == "snli_ve":
        assert option(command, "--lr") == "5e-5" and option(command, "--label-smoothing") == "0.0"
        assert option(command, "--prompt-type") == "prev_output" and "--add-caption" in command
        assert option(command, "--best-checkpoint-metric") == "snli_score"
    else:
        assert option(command, "--lr") == "1e-5" and option(command, "--label-smoothing") == "0.1"
        assert option(command, "--drop-worst-ratio") == "0.2" and option(command, "--drop-worst-after") == "6000"
        assert "--eval-cider" in command and "--freeze-encoder-embedding" in command
        assert option(command, "--best-checkpoint-metric") == "cider"
    assert not (tmp_path / "ckpt").exists(), "a dry run creates nothing"


def test_train_script_one_process_per_gpu_with_fp16(tmp_path):
    script = SCRIPTS / "snli_ve" / "train_snli_ve_mue.sh"
    env = {"PATH": fake_gpu_path(tmp_path, 4), "total_num_update": "1000", "warmup_ratio": "0.06"}
    command = dry_run(script, env)
    assert "--nproc_per_node=4" in command and "--cpu" not in command
    assert not any("MUE_CPU_DISTRIBUTED" in token for token in command)
    assert "--fp16" in command and option(command, "--fp16-scale-window") == "512"
    assert option(command, "--warmup-updates") == "60"
    command = dry_run(script, {**env, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert "--nproc_per_node=2" in command
    command = dry_run(script, {**env, "NPROC": "1", "FP16": "0", "restore_file": ""})
    assert "--nproc_per_node=1" in command and "--fp16" not in command
    assert not any(token.startswith("--restore-file") or token == "--reset-optimizer" for token in command)


def test_train_script_without_training_data_fails_clearly(tmp_path):
    result = run_script(SCRIPTS / "caption" / "train_caption_mue.sh",
                        {"DRY_RUN": "1", "data_dir": str(tmp_path / "missing")}, check=False)
    assert result.returncode != 0
    assert f"training file not found: {tmp_path / 'missing'}/caption_stage1_train.tsv" in result.stderr


# ----------------------------------------------------------------------------- evaluation and sweeps
def test_caption_evaluate_and_sweep_commands(tmp_path):
    env = {"PATH": no_gpu_path(tmp_path), "data_dir": "/data/caption", "path": "/ckpt/c.pt"}
    command = dry_run(SCRIPTS / "caption" / "evaluate_caption_mue.sh", env)
    assert command[1:4] == ["-m", "mue_fairseq.cli.evaluate", "/data/caption/caption_test.tsv"]
    assert option(command, "--beam") == "5" and option(command, "--max-len-b") == "16"
    assert option(command, "--no-repeat-ngram-size") == "3" and "--official-caption-scores" in command
    assert [option(command, f"--mue-{s}-threshold") for s in ("image", "text", "decoder")] == ["0.99", "0.7", "0.9"]
    overrides = eval(option(command, "--model-overrides"))  # a Python literal, as evaluate reads it
    assert overrides["eval_cider"] is False and overrides["selected_cols"] == "1,4,2"
    assert "--cpu" in command and option(command, "--gen-subset") == "test"

    command = dry_run(SCRIPTS / "caption" / "sweep_caption_mue.sh", {**env, "search": "coordinate"})
    assert command[1:4] == ["-m", "mue_fairseq.cli.sweep", "/data/caption/caption_val.tsv"]
    assert option(command, "--gen-subset") == "val" and option(command, "--search") == "coordinate"
    assert option(command, "--image-thresholds") == "1,0.97,0.95,0.9" and "--calibrate" in command
    assert option(command, "--target") == "0.99"


@pytest.fixture(scope="module")
def snli(tmp_path_factory):
    return tiny_checkpoint("snli_ve", tmp_path_factory)


def test_snli_ve_sweep_then_evaluate_scripts(snli, tmp_path):
    common = {"data": str(snli.split("valid")), "path": str(snli.checkpoint), "bpe_dir": snli.bpe_dir,
              "batch_size": "4", "PATH": no_gpu_path(tmp_path), "PYTHON": sys.executable}
    sweep_dir = tmp_path / "sweep"
    run = run_script(SCRIPTS / "snli_ve" / "sweep_snli_ve_mue.sh",
                     {**common, "result_path": str(sweep_dir), "image_thresholds": "1,0.3", "text_thresholds": "1",
                      "decoder_thresholds": "1,0.3", "target": "0.9", "warmup_batches": "1"}, "valid")
    with open(sweep_dir / "valid_sweep.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and rows[0]["full_depth"] == "1"
    assert (sweep_dir / "valid_sweep_pareto.png").stat().st_size > 10_000
    calibration = json.loads((sweep_dir / "valid_calibration.json").read_text())
    assert calibration["evaluate_command"] in run.stdout
    assert calibration["quality"] >= 0.9 * calibration["full_depth_quality"]

    # the calibration JSON sets the evaluate script's thresholds
    thresholds = calibration["thresholds"]
    command = dry_run(SCRIPTS / "snli_ve" / "evaluate_snli_ve_mue.sh",
                      {**common, "calibration": str(sweep_dir / "valid_calibration.json")}, "valid")
    for stream in ("image", "text", "decoder"):
        assert float(option(command, f"--mue-{stream}-threshold")) == thresholds[f"mue_{stream}_threshold"]

    eval_dir = tmp_path / "eval"
    run_script(SCRIPTS / "snli_ve" / "evaluate_snli_ve_mue.sh",
               {**common, "result_path": str(eval_dir), "img_thres": "0.3", "txt_thres": "0.3",
                "decoder_thres": "1", "mue_args": "--mue-kv-policy copy --no-plots"}, "valid")
    scores = json.loads((eval_dir / "valid_scores.json").read_text())
    assert scores["num_samples"] == 12 and 0 <= scores["accuracy"] <= 100
    summary = json.loads((eval_dir / "valid_exit_stats.json").read_text())["summary"]
    assert summary["mean_exit_layers"]["text"] < summary["layers"]["encoder"]
    assert summary["mean_exit_layers"]["decoder"] == summary["layers"]["decoder"]
    assert len(json.loads((eval_dir / "valid_predict.json").read_text())) == 12
