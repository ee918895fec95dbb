"""run_scripts/{caption,snli_ve,vqa,refcoco}/*_mue.sh: syntax, the commands they build (DRY_RUN=1) on CPU and
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

from fairseq_logs import log_records
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
    assert len(MUE_SCRIPTS) == 14
    result = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("task", ["snli_ve", "caption", "vqa", "refcoco"])
def test_train_script_cpu_processes_and_updates(task, tmp_path):
    script = SCRIPTS / task / f"train_{task}_mue.sh"
    data = f"{write_rows(tmp_path / 'train.tsv', 100)},{write_rows(tmp_path / 'valid.tsv', 7)}"
    env = {"PATH": no_gpu_path(tmp_path), "NPROC": "2", "data": data, "batch_size": "4", "update_freq": "1",
           "restore_file": "/ckpt/ofa_base.pt", "save_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
           "extra_args": "--layer-reduction sum"}
    command = dry_run(script, env)
    assert command[:2] == ["env", "MUE_CPU_DISTRIBUTED=1"]  # the plugin's CPU support for torchrun's ranks
    launcher = command.index("torch.distributed.run")
    port = {"snli_ve": 7061, "caption": 1061, "vqa": 8314, "refcoco": 6051}[task]
    assert command[launcher + 1:launcher + 3] == ["--nproc_per_node=2", f"--master_port={port}"]
    module = command.index("mue_fairseq.cli.train")  # OFA's train.py command line
    assert command[module - 1] == "-m" and command[module + 1] == data  # data: first positional argument
    for flag in ("--cpu", "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                 "--encoder-normalize-before", "--scale-attn", "--add-type-embedding", "--find-unused-parameters"):
        assert flag in command, flag
    assert "--fp16" not in command
    assert option(command, "--restore-file") == "/ckpt/ofa_base.pt"
    assert option(command, "--arch") == "mue_ofa_base" and option(command, "--criterion") == "mue_layerwise_ce"
    assert option(command, "--user-dir") == str(REPO / "mue_fairseq")
    assert Path(option(command, "--bpe-dir")).resolve() == (REPO.parent / "shared" / "ofa_bpe").resolve()
    # OFA's schedule, derived by mue_fairseq.cli.train from the epochs (tests/test_ofa_train_cli.py):
    # 5 epochs (OFA's 15 for VQA, 10 for RefCOCO), warm-up ratio 0.06 (OFA's 0.04 for VQA)
    epochs, ratio = {"vqa": ("15", "0.04"), "refcoco": ("10", "0.06")}.get(task, ("5", "0.06"))
    assert option(command, "--max-epoch") == epochs and option(command, "--warmup-ratio") == ratio
    assert not any(t.startswith(("--total-num-update", "--warmup-updates")) for t in command)
    assert option(command, "--lr-scheduler") == "polynomial_decay"
    assert command[-2:] == ["--layer-reduction", "sum"]
    if task == "snli_ve":
        assert option(command, "--lr") == "5e-5" and option(command, "--label-smoothing") == "0.0"
        assert option(command, "--prompt-type") == "prev_output" and "--add-caption" in command
        assert option(command, "--best-checkpoint-metric") == "snli_score"
    elif task == "vqa":
        assert option(command, "--task") == "vqa_gen" and option(command, "--selected-cols") == "0,5,2,3,4"
        assert option(command, "--lr") == "5e-5" and option(command, "--label-smoothing") == "0.1"
        assert option(command, "--ans2label-file") == str(REPO / "dataset/vqa_data/trainval_ans2label.pkl")
        assert option(command, "--val-inference-type") == "allcand" and option(command, "--prompt-type") == "prev_output"
        assert option(command, "--ema-decay") == "0.9999" and option(command, "--patch-image-size") == "480"
        for flag in ("--uses-ema", "--store-ema", "--ema-fp32", "--add-object", "--freeze-encoder-embedding"):
            assert flag in command, flag
        assert "--unconstrained-training" not in command
        assert option(command, "--best-checkpoint-metric") == "vqa_score"
    elif task == "refcoco":
        assert option(command, "--task") == "refcoco" and option(command, "--selected-cols") == "0,4,2,3"
        assert option(command, "--lr") == "5e-5" and option(command, "--patch-image-size") == "512"
        assert "--eval-acc" in command and option(command, "--best-checkpoint-metric") == "score"
        assert json.loads(option(command, "--eval-args")) == {"beam": 5, "min_len": 4, "max_len_a": 0, "max_len_b": 4}
    else:
        assert option(command, "--lr") == "1e-5" and option(command, "--label-smoothing") == "0.1"
        assert option(command, "--drop-worst-ratio") == "0.2" and option(command, "--drop-worst-after") == "6000"
        assert "--eval-cider" in command and "--freeze-encoder-embedding" in command
        assert option(command, "--best-checkpoint-metric") == "cider"
    assert not (tmp_path / "ckpt").exists(), "a dry run creates nothing"


def test_train_script_one_process_per_gpu_with_fp16(tmp_path):
    script = SCRIPTS / "snli_ve" / "train_snli_ve_mue.sh"
    env = {"PATH": fake_gpu_path(tmp_path, 4), "warmup_ratio": "0.1"}
    command = dry_run(script, env)
    assert "--nproc_per_node=4" in command and "--cpu" not in command
    assert not any("MUE_CPU_DISTRIBUTED" in token for token in command)
    assert "--fp16" in command and option(command, "--fp16-scale-window") == "512"
    assert option(command, "--warmup-ratio") == "0.1"
    command = dry_run(script, {**env, "CUDA_VISIBLE_DEVICES": "2,3"})
    assert "--nproc_per_node=2" in command
    command = dry_run(script, {**env, "NPROC": "1", "FP16": "0", "restore_file": ""})
    assert "--nproc_per_node=1" in command and "--fp16" not in command
    assert not any(token.startswith("--restore-file") or token == "--reset-optimizer" for token in command)


@pytest.mark.parametrize("data, message", [
    ("{d}/caption_stage1_train.tsv", "data={d}/caption_stage1_train.tsv: expected training file(s) and a validation file"),
    ("{d}/caption_stage1_train.tsv,{d}/caption_val.tsv", "data file not found: {d}/caption_stage1_train.tsv"),
])
def test_train_script_without_training_data_fails_clearly(data, message, tmp_path):
    missing = tmp_path / "missing"
    env = {"data": data.format(d=missing), "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "ckpt"),
           "PYTHON": str(tmp_path / "no_python")}  # refused before any process starts
    result = run_script(SCRIPTS / "caption" / "train_caption_mue.sh", env, check=False)
    assert result.returncode != 0
    assert message.format(d=missing) in result.stderr
    assert not (tmp_path / "ckpt").exists()



@pytest.mark.parametrize("variable", ["total_num_update", "warmup_updates"])
def test_train_script_refuses_the_schedule_variables_it_no_longer_reads(variable, tmp_path):
    env = {"PATH": no_gpu_path(tmp_path), variable: "100", "DRY_RUN": "1"}
    result = run_script(SCRIPTS / "snli_ve" / "train_snli_ve_mue.sh", env, check=False)
    assert result.returncode == 2
    assert "set warmup_ratio=0" in result.stderr and "--total-num-update" in result.stderr


def test_caption_journey_script_chains_reference_finetune_calibrate_evaluate(tmp_path):
    script = SCRIPTS / "caption" / "journey_caption_mue.sh"
    env = {"PATH": no_gpu_path(tmp_path), "start": "/ckpt/ofa.pt", "data_dir": "/data/c", "work_dir": "/w",
           "DRY_RUN": "1"}
    result = run_script(script, env)
    reference, finetune, sweep, evaluate = [shlex.split(line) for line in result.stdout.strip().splitlines()]
    # the start as OFA computes it: no MuE option, so OFA's model
    assert reference[2:4] == ["mue_fairseq.cli.evaluate", "/data/c/caption_val.tsv"]
    assert option(reference, "--path") == "/ckpt/ofa.pt" and not any(t.startswith("--mue-") for t in reference)
    assert option(finetune, "--restore-file") == "/ckpt/ofa.pt" and option(finetune, "--criterion") == "mue_layerwise_ce"
    assert option(finetune, "--save-dir") == "/w/tuned"
    assert sweep[2] == "mue_fairseq.cli.sweep" and option(sweep, "--path") == "/w/tuned/checkpoint_best.pt"
    assert sweep[sweep.index("--reference-quality") + 1] == "REFERENCE" and option(sweep, "--target") == "0.96"
    assert evaluate[3] == "/data/c/caption_test.tsv" and option(evaluate, "--results-path") == "/w/test"

    done = tmp_path / "w"
    (done / "reference").mkdir(parents=True)
    (done / "reference" / "val_scores.json").write_text(json.dumps({"cider_d": 123.5}))
    result = run_script(script, {**env, "work_dir": str(done), "steps": "calibrate"})
    sweep = shlex.split(result.stdout.strip())
    assert sweep[sweep.index("--reference-quality") + 1] == "123.5"

    result = run_script(script, {**env, "DRY_RUN": "0", "steps": "reference"}, check=False)
    assert result.returncode == 2 and "start=/ckpt/ofa.pt: no such checkpoint" in result.stderr
    result = run_script(script, {**env, "start": "", "DRY_RUN": "0"}, check=False)
    assert result.returncode != 0 and "set start=" in result.stderr

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


def test_vqa_train_script_options(tmp_path):
    script = SCRIPTS / "vqa" / "train_vqa_mue.sh"
    env = {"PATH": no_gpu_path(tmp_path), "uses_ema": "0", "add_object": "0",
           "unconstrained_training": "1", "val_inference_type": "beamsearch", "freeze_embeddings": "0"}
    command = dry_run(script, env)
    assert "--unconstrained-training" in command and not any(t.startswith("--ans2label-file") for t in command)
    assert not any("ema" in t for t in command) and "--add-object" not in command
    assert not any(t.startswith("--freeze") for t in command)
    assert option(command, "--val-inference-type") == "beamsearch" and option(command, "--warmup-ratio") == "0.04"
    assert "--freeze-encoder-embedding" in dry_run(script, {**env, "freeze_embeddings": "1"})


def test_refcoco_train_script_datasets(tmp_path):
    script = SCRIPTS / "refcoco" / "train_refcoco_mue.sh"
    env = {"PATH": no_gpu_path(tmp_path), "data_dir": "/data/g"}
    command = dry_run(script, {**env, "dataset": "refcocog"})
    assert command[command.index("mue_fairseq.cli.train") + 1] == "/data/g/refcocog_train.tsv,/data/g/refcocog_val.tsv"
    assert option(command, "--max-epoch") == "12"  # OFA's RefCOCOg epochs; RefCOCO and RefCOCO+ have 10
    assert option(dry_run(script, {**env, "dataset": "refcocoplus"}), "--max-epoch") == "10"
    result = run_script(script, {**env, "DRY_RUN": "1", "dataset": "refclef"}, check=False)
    assert result.returncode != 0 and "dataset=refclef: choose refcoco, refcocoplus or refcocog" in result.stderr


def test_vqa_evaluate_and_sweep_commands(tmp_path):
    env = {"PATH": no_gpu_path(tmp_path), "data_dir": "/data/vqa", "path": "/ckpt/v.pt"}
    command = dry_run(SCRIPTS / "vqa" / "evaluate_vqa_mue.sh", env, "val")
    assert command[1:4] == ["-m", "mue_fairseq.cli.evaluate", "/data/vqa/vqa_val.tsv"]
    # all-candidate inference by default: no beam search options
    assert "--beam-search-vqa-eval" not in command and not any(t.startswith("--beam=") for t in command)
    assert option(command, "--task") == "vqa_gen" and option(command, "--batch-size") == "8"
    assert [option(command, f"--mue-{s}-threshold") for s in ("image", "text", "decoder")] == ["1", "1", "1"]
    overrides = eval(option(command, "--model-overrides"))  # a Python literal, as evaluate reads it
    assert overrides == {"data": "/data/vqa/vqa_val.tsv", "bpe_dir": str(REPO.parent / "shared" / "ofa_bpe"),
                         "selected_cols": "0,5,2,3,4", "ans2label_file": "/data/vqa/trainval_ans2label.pkl",
                         "valid_batch_size": 20}
    assert "--cpu" in command and option(command, "--gen-subset") == "val"
    assert option(command, "--results-path") == str(REPO / "results/vqa_mue_val_allcand")
    assert "--ema-eval" not in command
    assert "--ema-eval" in dry_run(SCRIPTS / "vqa" / "evaluate_vqa_mue.sh", {**env, "ema_eval": "1"}, "val")

    command = dry_run(SCRIPTS / "vqa" / "evaluate_vqa_mue.sh", {**env, "inference": "beamsearch"}, "test")
    assert "--beam-search-vqa-eval" in command and "--unnormalized" in command
    assert option(command, "--beam") == "5" and option(command, "--temperature") == "1.0"
    assert option(command, "--batch-size") == "16" and option(command, "--gen-subset") == "test"
    result = run_script(SCRIPTS / "vqa" / "evaluate_vqa_mue.sh", {**env, "DRY_RUN": "1", "inference": "greedy"},
                        check=False)
    assert result.returncode != 0 and "inference=greedy: choose allcand or beamsearch" in result.stderr

    command = dry_run(SCRIPTS / "vqa" / "sweep_vqa_mue.sh", {**env, "search": "coordinate"})
    assert command[1:4] == ["-m", "mue_fairseq.cli.sweep", "/data/vqa/vqa_val.tsv"]
    assert option(command, "--task") == "vqa_gen" and option(command, "--search") == "coordinate"
    assert "--calibrate" in command and "--beam-search-vqa-eval" not in command
    assert eval(option(command, "--model-overrides"))["ans2label_file"] == "/data/vqa/trainval_ans2label.pkl"


def test_refcoco_evaluate_and_sweep_commands(tmp_path):
    env = {"PATH": no_gpu_path(tmp_path), "data_dir": "/data/rc", "path": "/ckpt/r.pt"}
    for script, module in (("evaluate_refcoco_mue.sh", "evaluate"), ("sweep_refcoco_mue.sh", "sweep")):
        command = dry_run(SCRIPTS / "refcoco" / script, {**env, "dataset": "refcocoplus"}, "testA")
        assert command[1:4] == ["-m", f"mue_fairseq.cli.{module}", "/data/rc/refcocoplus_testA.tsv"]
        # OFA's evaluation arguments: exactly four location tokens
        assert [option(command, f) for f in ("--beam", "--min-len", "--max-len-a", "--max-len-b")] == ["5", "4", "0", "4"]
        assert option(command, "--task") == "refcoco" and option(command, "--gen-subset") == "refcocoplus_testA"
        assert eval(option(command, "--model-overrides"))["selected_cols"] == "0,4,2,3"
    assert "--calibrate" in command and option(command, "--image-thresholds") == "1,0.97,0.95,0.9"

    calibration = tmp_path / "cal.json"
    calibration.write_text(json.dumps({"thresholds": {"mue_image_threshold": 0.9, "mue_text_threshold": 0.8,
                                                      "mue_decoder_threshold": 0.7}}))
    command = dry_run(SCRIPTS / "refcoco" / "evaluate_refcoco_mue.sh",
                      {**env, "calibration": str(calibration), "PYTHON": sys.executable})
    assert [option(command, f"--mue-{s}-threshold") for s in ("image", "text", "decoder")] == ["0.9", "0.8", "0.7"]
    assert option(command, "--gen-subset") == "refcoco_val" and option(command, "--path") == "/ckpt/r.pt"


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


@pytest.mark.parametrize("task", ["vqa", "refcoco"])
def test_vqa_and_refcoco_train_commands_parse_as_train_arguments(task, tmp_path):
    from mue_fairseq.cli.train import parse_train_args

    env = {"PATH": no_gpu_path(tmp_path), "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "ckpt")}
    command = dry_run(SCRIPTS / task / f"train_{task}_mue.sh", env)
    train_argv = command[command.index("mue_fairseq.cli.train") + 1:]
    args, cfg = parse_train_args(train_argv)
    assert args.warmup_ratio == {"vqa": 0.04, "refcoco": 0.06}[task] and cfg.dataset.ignore_unused_valid_subsets
    assert args.arch == "mue_ofa_base" and args.criterion == "mue_layerwise_ce"
    if task == "vqa":
        assert args.task == "vqa_gen" and args.uses_ema and args.store_ema and args.add_object
        assert args.valid_batch_size == 20 and args.max_object_length == 30 and args.keep_last_epochs == 15
    else:
        assert args.task == "refcoco" and args.eval_acc and json.loads(args.eval_args)["max_len_b"] == 4


@pytest.fixture(scope="module")
def tiny_vqa(tmp_path_factory):
    return tiny_checkpoint("vqa_gen", tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_refcoco(tmp_path_factory):
    return tiny_checkpoint("refcoco", tmp_path_factory)


@pytest.mark.parametrize("inference", ["allcand", "beamsearch"])
def test_vqa_evaluate_script_runs(tiny_vqa, inference, tmp_path):
    eval_dir = tmp_path / "eval"
    run_script(SCRIPTS / "vqa" / "evaluate_vqa_mue.sh",
               {"data": str(tiny_vqa.split("valid")), "path": str(tiny_vqa.checkpoint), "bpe_dir": tiny_vqa.bpe_dir,
                "ans2label_file": str(tiny_vqa.data_dir / "vqa_ans2label.pkl"), "batch_size": "4",
                "inference": inference, "result_path": str(eval_dir), "img_thres": "0.3", "txt_thres": "0.3",
                "mue_args": "--no-plots", "PATH": no_gpu_path(tmp_path), "PYTHON": sys.executable}, "valid")
    scores = json.loads((eval_dir / "valid_scores.json").read_text())
    assert scores["num_samples"] == len(tiny_vqa.split("valid").read_text().splitlines())
    predictions = json.loads((eval_dir / "valid_predict.json").read_text())
    assert len(predictions) == scores["num_samples"] and {"question_id", "answer"} <= set(predictions[0])
    summary = json.loads((eval_dir / "valid_exit_stats.json").read_text())["summary"]
    assert summary["mean_exit_layers"]["text"] < summary["layers"]["encoder"]


def test_refcoco_sweep_then_evaluate_scripts(tiny_refcoco, tmp_path):
    common = {"data": str(tiny_refcoco.split("valid")), "path": str(tiny_refcoco.checkpoint),
              "bpe_dir": tiny_refcoco.bpe_dir, "batch_size": "4", "PATH": no_gpu_path(tmp_path),
              "PYTHON": sys.executable}
    sweep_dir = tmp_path / "sweep"
    run_script(SCRIPTS / "refcoco" / "sweep_refcoco_mue.sh",
               {**common, "result_path": str(sweep_dir), "image_thresholds": "1,0.3", "text_thresholds": "1",
                "decoder_thresholds": "1", "target": "0.01", "warmup_batches": "1"}, "val")
    with open(sweep_dir / "refcoco_val_sweep.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    calibration = sweep_dir / "refcoco_val_calibration.json"
    eval_dir = tmp_path / "eval"
    run_script(SCRIPTS / "refcoco" / "evaluate_refcoco_mue.sh",
               {**common, "result_path": str(eval_dir), "calibration": str(calibration), "mue_args": "--no-plots"},
               "val")
    scores = json.loads((eval_dir / "refcoco_val_scores.json").read_text())
    assert scores["num_samples"] == len(tiny_refcoco.split("valid").read_text().splitlines())
    predictions = json.loads((eval_dir / "refcoco_val_predict.json").read_text())
    assert len(predictions) == scores["num_samples"]


# ----------------------------------------------------------------------------- training end to end
@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    from data_utils.synthetic import build_synthetic_task

    directory = tmp_path_factory.mktemp("synthetic")
    build_synthetic_task(str(directory), seed=3, num_train=4, num_valid=3, num_test=1)
    return directory


@pytest.mark.parametrize("task, metric", [("caption", "cider"), ("snli_ve", "snli_score")])
def test_train_script_trains_validates_and_saves(task, metric, synthetic_data, tmp_path):
    """train_{caption,snli_ve}_mue.sh under torchrun (one CPU process), from the tiny OFA checkpoint as
    MuE's model: one epoch of two updates, OFA's warm-up ratio turned into a schedule, validation
    with and without exits, checkpoints saved."""
    from ofa_fixtures import BPE_DIR, REFERENCE_DIR, require_file
    from ofa_stage2_scripts import TINY_CAPTION_MODEL

    valid = "caption_valid.tsv" if task == "caption" else "snli_ve_valid.tsv"
    env = {"PATH": os.environ["PATH"], "PYTHON": sys.executable, "NPROC": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "data_dir": str(synthetic_data), "data": f"{synthetic_data / f'{task}_train.tsv'},{synthetic_data / valid}",
           "restore_file": str(require_file(REFERENCE_DIR / "ofa_tiny_caption.pt")),
           "bpe_dir": str(require_file(BPE_DIR)), "patch_image_size": "64", "max_epoch": "1", "batch_size": "2",
           "update_freq": "1", "save_dir": str(tmp_path / "ckpt"), "log_dir": str(tmp_path / "logs"),
           "extra_args": " ".join([*TINY_CAPTION_MODEL, "--mue-decoder-threshold=0.9"])}
    result = run_script(SCRIPTS / task / f"train_{task}_mue.sh", env)
    log = result.stdout + result.stderr
    rows = len((synthetic_data / f"{task}_train.tsv").read_text().splitlines())
    updates = -(-rows // 2)
    # the schedule mue_fairseq.cli.train derives from --max-epoch 1 and --warmup-ratio 0.06
    assert f"total {updates} updates, warm-up {int(updates * 0.06)} updates" in log, log[-3000:]
    train = log_records(log, "train")
    assert [int(r["num_updates"]) for r in train] == [updates], log[-3000:]
    assert all("loss_layer1" in r and "loss_layer2" in r for r in train), train  # MuE's layer-wise loss
    valid_records = log_records(log, "valid")
    assert len(valid_records) == 1 and metric in valid_records[0] and f"{metric}_mue" in valid_records[0], valid_records
    saved = list((tmp_path / "ckpt").glob("*/checkpoint_last.pt"))
    assert len(saved) == 1 and (saved[0].parent / "checkpoint_best.pt").exists()
    assert (tmp_path / "logs").is_dir() and any((tmp_path / "logs").iterdir())  # the log file
