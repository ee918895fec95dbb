"""OFA's training scripts through `python -m mue_fairseq.cli.train`, and OFA's `--warmup-ratio` schedule.

The argument lists below are those of OFA's `run_scripts/caption/train_caption_stage1_base.sh` and
`run_scripts/snli_ve/train_snli_ve_base.sh` (OFA-Sys/OFA at a36b91ce), variable by variable, with
only what a CPU machine forces changed: paths (the built-in synthetic data, the shared BPE files,
this plugin, a tiny OFA-trained checkpoint), the model options of that checkpoint, smaller images,
`--cpu` instead of `--fp16`, and `--max-update 2`.
"""
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import mue_fairseq  # noqa: F401  (registers the plugin)
from fairseq_logs import log_records
from ofa_fixtures import BPE_DIR, fixture_paths

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "mue_fairseq"
# Model options of the shared tiny OFA checkpoints (their `cfg["model"]`) that OFA's scripts leave
# to `--arch ofa_base`: sizes, and the SNLI-VE one's residual scales and frozen BatchNorm.
FIXTURE_MODEL = {
    "caption": ["--encoder-embed-dim=32", "--encoder-ffn-embed-dim=128", "--encoder-layers=2", "--decoder-layers=2",
                "--encoder-attention-heads=4", "--decoder-attention-heads=4", "--resnet-type=resnet18",
                "--image-bucket-size=16"],
    "snli_ve": ["--encoder-embed-dim=32", "--encoder-ffn-embed-dim=96", "--encoder-layers=3", "--decoder-layers=1",
                "--encoder-attention-heads=2", "--decoder-attention-heads=2", "--resnet-type=resnet18",
                "--image-bucket-size=20", "--token-bucket-size=128", "--scale-resids", "--freeze-resnet"],
}


def fixture_checkpoint(task: str) -> Path:
    checkpoint, _ = fixture_paths(task)
    assert checkpoint.is_file(), f"shared OFA fixture {checkpoint} is missing (set MUE_SHARED_DIR)"
    assert BPE_DIR.is_dir(), f"shared OFA BPE files {BPE_DIR} are missing (set MUE_SHARED_DIR)"
    return checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The built-in task: 8 caption and 8 SNLI-VE training rows, 2 / 4 validation rows."""
    from data_utils.synthetic import build_synthetic_task

    directory = tmp_path_factory.mktemp("ofa_scripts_data")
    build_synthetic_task(str(directory), seed=5, num_train=4, num_valid=2, num_test=1)
    for name, rows in (("caption_train", 8), ("snli_ve_train", 8)):
        assert len((directory / f"{name}.tsv").read_text().splitlines()) == rows  # the hand-computed cases need it
    return directory


def caption_stage1_args(data_dir: Path, save_dir: Path) -> List[str]:
    """run_scripts/caption/train_caption_stage1_base.sh."""
    bpe_dir = BPE_DIR
    user_dir = PLUGIN
    data = f"{data_dir}/caption_train.tsv,{data_dir}/caption_valid.tsv"
    restore_file = fixture_checkpoint("caption")
    selected_cols = "0,4,2"
    task, arch, criterion = "caption", "ofa_base", "adjust_label_smoothed_cross_entropy"
    label_smoothing, lr, max_epoch, warmup_ratio, batch_size, update_freq = 0.1, 1e-5, 5, 0.06, 8, 4
    resnet_drop_path_rate, encoder_drop_path_rate, decoder_drop_path_rate = 0.0, 0.1, 0.1
    dropout, attention_dropout, max_src_length, max_tgt_length, num_bins = 0.1, 0.0, 80, 20, 1000
    patch_image_size = 64  # OFA: 480
    eval_cider_cached = data_dir / "caption_valid_cider_df.json"  # OFA: cider_cached_tokens/coco-valid-words.p
    drop_worst_ratio, drop_worst_after = 0.2, 6000
    save_path = save_dir
    return [
        data, f"--selected-cols={selected_cols}", f"--bpe-dir={bpe_dir}", f"--user-dir={user_dir}",
        f"--restore-file={restore_file}", "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        f"--save-dir={save_path}", f"--task={task}", f"--arch={arch}", f"--criterion={criterion}",
        f"--label-smoothing={label_smoothing}", f"--batch-size={batch_size}", f"--update-freq={update_freq}",
        "--encoder-normalize-before", "--decoder-normalize-before", "--share-decoder-input-output-embed",
        "--share-all-embeddings", "--layernorm-embedding", "--patch-layernorm-embedding", "--code-layernorm-embedding",
        f"--resnet-drop-path-rate={resnet_drop_path_rate}", f"--encoder-drop-path-rate={encoder_drop_path_rate}",
        f"--decoder-drop-path-rate={decoder_drop_path_rate}", f"--dropout={dropout}",
        f"--attention-dropout={attention_dropout}", "--weight-decay=0.01", "--optimizer=adam",
        "--adam-betas=(0.9,0.999)", "--adam-eps=1e-08", "--clip-norm=1.0", "--lr-scheduler=polynomial_decay",
        f"--lr={lr}", f"--max-epoch={max_epoch}", f"--warmup-ratio={warmup_ratio}", "--log-format=simple",
        "--log-interval=10", "--fixed-validation-seed=7", "--no-epoch-checkpoints", "--keep-best-checkpoints=1",
        "--save-interval=1", "--validate-interval=1", "--save-interval-updates=500", "--validate-interval-updates=500",
        "--eval-cider", f"--eval-cider-cached-tokens={eval_cider_cached}",
        '--eval-args={"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}', "--best-checkpoint-metric=cider",
        "--maximize-best-checkpoint-metric", f"--max-src-length={max_src_length}", f"--max-tgt-length={max_tgt_length}",
        "--find-unused-parameters", "--freeze-encoder-embedding", "--freeze-decoder-embedding", "--add-type-embedding",
        "--scale-attn", "--scale-fc", "--scale-heads", "--disable-entangle", f"--num-bins={num_bins}",
        f"--patch-image-size={patch_image_size}", f"--drop-worst-ratio={drop_worst_ratio}",
        f"--drop-worst-after={drop_worst_after}", "--fp16-scale-window=512", "--num-workers=0",
        # CPU machine: --cpu for --fp16, the tiny fixture's model, two updates.
        "--cpu", *FIXTURE_MODEL["caption"], "--max-update=2",
    ]


def snli_ve_args(data_dir: Path, save_dir: Path) -> List[str]:
    """run_scripts/snli_ve/train_snli_ve_base.sh (its loop sets lr to 5e-5)."""
    bpe_dir = BPE_DIR
    user_dir = PLUGIN
    data = f"{data_dir}/snli_ve_train.tsv,{data_dir}/snli_ve_valid.tsv"
    restore_file = fixture_checkpoint("snli_ve")
    selected_cols = "0,2,3,4,5"
    task, arch, criterion = "snli_ve", "ofa_base", "adjust_label_smoothed_cross_entropy"
    label_smoothing, lr, max_epoch, warmup_ratio, batch_size, update_freq = 0.0, 5e-5, 5, 0.06, 4, 8
    resnet_drop_path_rate, encoder_drop_path_rate, decoder_drop_path_rate = 0.0, 0.1, 0.1
    dropout, attention_dropout, max_src_length, max_tgt_length, num_bins = 0.1, 0.0, 80, 20, 1000
    patch_image_size = 64  # OFA: 480
    prompt_type = "prev_output"
    save_path = save_dir
    return [
        data, f"--selected-cols={selected_cols}", f"--bpe-dir={bpe_dir}", f"--user-dir={user_dir}",
        f"--restore-file={restore_file}", "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        f"--save-dir={save_path}", f"--task={task}", f"--arch={arch}", f"--criterion={criterion}",
        f"--label-smoothing={label_smoothing}", f"--batch-size={batch_size}", f"--update-freq={update_freq}",
        "--encoder-normalize-before", "--decoder-normalize-before", "--share-decoder-input-output-embed",
        "--share-all-embeddings", "--layernorm-embedding", "--patch-layernorm-embedding", "--code-layernorm-embedding",
        f"--resnet-drop-path-rate={resnet_drop_path_rate}", f"--encoder-drop-path-rate={encoder_drop_path_rate}",
        f"--decoder-drop-path-rate={decoder_drop_path_rate}", f"--dropout={dropout}",
        f"--attention-dropout={attention_dropout}", "--weight-decay=0.01", "--optimizer=adam",
        "--adam-betas=(0.9,0.999)", "--adam-eps=1e-08", "--clip-norm=1.0", "--lr-scheduler=polynomial_decay",
        f"--lr={lr}", f"--max-epoch={max_epoch}", f"--warmup-ratio={warmup_ratio}", "--log-format=simple",
        "--log-interval=10", "--fixed-validation-seed=7", "--keep-best-checkpoints=1", "--save-interval=1",
        "--validate-interval=1", "--save-interval-updates=500", "--validate-interval-updates=500",
        "--best-checkpoint-metric=snli_score", "--maximize-best-checkpoint-metric",
        f"--max-src-length={max_src_length}", f"--max-tgt-length={max_tgt_length}", "--find-unused-parameters",
        "--add-type-embedding", "--scale-attn", "--scale-fc", "--scale-heads", "--disable-entangle",
        f"--num-bins={num_bins}",
        f"--patch-image-size={patch_image_size}", f"--prompt-type={prompt_type}", "--add-caption",
        "--fp16-scale-window=512", "--num-workers=0",
        # CPU machine: --cpu for --fp16, the tiny fixture's model, two updates.
        "--cpu", *FIXTURE_MODEL["snli_ve"], "--max-update=2",
    ]


def run_train_cli(argv: List[str]) -> str:
    """`python -m mue_fairseq.cli.train ARGV` from the repository root; its log."""
    result = subprocess.run([sys.executable, "-m", "mue_fairseq.cli.train", *argv], cwd=REPO, capture_output=True,
                            text=True, env=_child_env(), timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mue_fairseq.cli.train failed ({result.returncode}):\n{log[-6000:]}"
    return log


def _child_env() -> Dict[str, str]:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


# script -> (task, argument list, validation metric, lr, hand-computed total updates)
# Both: 8 training rows in batches of 8 (caption) / 4 (SNLI-VE) give 1 / 2 batches per epoch, one
# update each at --update-freq 4 / 8, so 5 updates over --max-epoch 5, and int(0.06 * 5) = 0 warm-up.
SCRIPTS = {
    "caption_stage1": ("caption", caption_stage1_args, "cider", 1e-5, 5),
    "snli_ve": ("snli_ve", snli_ve_args, "snli_score", 5e-5, 5),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_ofa_training_script_trains_validates_and_saves(script, data_dir, tmp_path):
    task, make_args, metric, lr, total = SCRIPTS[script]
    save_dir = tmp_path / "checkpoints"
    log = run_train_cli(make_args(data_dir, save_dir))

    assert f"total {total} updates, warm-up 0 updates" in log
    train = log_records(log, "train")
    assert [int(r["num_updates"]) for r in train] == [1, 2], log[-3000:]  # one update per epoch, stopped at 2
    # polynomial decay to 0 over the derived 5 updates (fairseq's --max-update 2 would give 0 here)
    assert float(train[-1]["lr"]) == pytest.approx(lr * (1 - 2 / total))
    valid = log_records(log, "valid")
    assert len(valid) == 2 and all(metric in record for record in valid), log[-3000:]
    assert all(math.isfinite(float(record[metric])) for record in valid)

    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (save_dir / name).is_file(), f"no {name} in {sorted(p.name for p in save_dir.iterdir())}"
    assert list(save_dir.glob(f"checkpoint.best_{metric}_*.pt")), "--keep-best-checkpoints=1 kept none"
    saved = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["optimizer_history"][-1]["num_updates"] == 2
    assert saved["cfg"]["lr_scheduler"]["total_num_update"] == total
    assert saved["cfg"]["lr_scheduler"]["warmup_updates"] == 0
    restored = torch.load(fixture_checkpoint(task), map_location="cpu", weights_only=False)["model"]
    trained = saved["model"]
    assert restored.keys() == trained.keys()
    changed = [key for key, value in trained.items()
               if value.is_floating_point() and not torch.equal(value, restored[key])]
    assert changed, "two updates changed no weight of the restored checkpoint"


# --------------------------------------------------------------------------- the schedule
def parse(argv: List[str]):
    from mue_fairseq.cli.train import parse_train_args

    return parse_train_args(argv)


def caption_argv(data_dir: Path, *extra: str) -> List[str]:
    return [f"{data_dir}/caption_train.tsv,{data_dir}/caption_valid.tsv", "--task", "caption", "--arch", "ofa_tiny",
            "--bpe-dir", str(BPE_DIR), "--selected-cols", "0,4,2", "--optimizer", "adam", "--lr", "1e-3",
            "--lr-scheduler", "polynomial_decay", "--cpu", *extra]


def test_warmup_schedule_counts_updates_per_epoch_with_each_epochs_update_freq():
    from mue_fairseq.cli.train import warmup_schedule

    # 7 batches: ceil(7/4) in epoch 1, ceil(7/2) in epochs 2 and 3 (the last entry holds) = 2 + 4 + 4
    assert warmup_schedule(7, 3, [4, 2], 0.25) == (10, 2)
    assert warmup_schedule(7, 3, [1], 0.06) == (21, 1)  # int(1.26)
    with pytest.raises(ValueError, match="update-freq"):
        warmup_schedule(7, 3, [], 0.06)


@pytest.mark.parametrize("num_shards, total, warmup", [(1, 11, 2), (2, 7, 1)])
def test_warmup_ratio_sets_ofa_schedule_from_the_training_split(num_shards, total, warmup, data_dir):
    """8 rows in batches of 3: 3 batches (1 process) or 2 per process (2 processes); --update-freq 2,1
    over 4 epochs: ceil(3/2) + 3 * 3 = 11, or ceil(2/2) + 3 * 2 = 7; warm-up int(0.2 * total)."""
    from fairseq.optim import build_optimizer
    from fairseq.optim.lr_scheduler import build_lr_scheduler

    from mue_fairseq.cli.train import apply_warmup_ratio

    args, cfg = parse(caption_argv(data_dir, "--batch-size", "3", "--update-freq", "2,1", "--max-epoch", "4",
                                   "--warmup-ratio", "0.2", "--max-update", "3"))
    apply_warmup_ratio(cfg, args.warmup_ratio, num_shards=num_shards, shard_id=0)
    assert (cfg.lr_scheduler.total_num_update, cfg.lr_scheduler.warmup_updates) == (total, warmup)

    optimizer = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_lr_scheduler(cfg.lr_scheduler, optimizer)
    # OFA's schedule: linear warm-up to 1e-3 over `warmup` updates, then linear decay to 0 at `total`
    expected = [1e-3 * u / warmup if u <= warmup else 1e-3 * (total - u) / (total - warmup)
                for u in range(1, total + 1)]
    assert [scheduler.step_update(u) for u in range(1, total + 1)] == pytest.approx(expected)
    assert scheduler.step_update(total + 3) == 0


def test_total_num_update_may_be_left_out(data_dir):
    _, cfg = parse(caption_argv(data_dir, "--max-update", "30"))
    assert cfg.lr_scheduler.total_num_update == 30  # fairseq's intent: decay over --max-update
    _, cfg = parse(caption_argv(data_dir))
    assert cfg.lr_scheduler.total_num_update == 1_000_000  # OFA's default
    _, cfg = parse(caption_argv(data_dir, "--max-update", "30", "--total-num-update", "12"))
    assert cfg.lr_scheduler.total_num_update == 12


def test_comma_joined_tsv_data_skips_fairseqs_valid_file_search(data_dir):
    _, cfg = parse(caption_argv(data_dir))
    assert cfg.dataset.ignore_unused_valid_subsets


@pytest.mark.parametrize("argv, message", [
    (["--lr-scheduler", "inverse_sqrt", "--warmup-ratio", "0.1"], "--warmup-ratio is an option of --lr-scheduler "
                                                                 "polynomial_decay, not inverse_sqrt"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1), got 1.5"),
    (["--user-dir=../../ofa_module"], "--user-dir ../../ofa_module is OFA's own plugin"),
])
def test_unsupported_ofa_options_are_named(argv, message, data_dir, capsys):
    with pytest.raises(SystemExit):
        parse(caption_argv(data_dir, *argv))
    assert message in capsys.readouterr().err


def test_warmup_ratio_without_max_epoch_warns_as_ofa_ignores_it(data_dir, caplog):
    from mue_fairseq.cli.train import apply_warmup_ratio

    args, cfg = parse(caption_argv(data_dir, "--batch-size", "3", "--warmup-ratio", "0.2", "--max-update", "9"))
    with caplog.at_level("WARNING", logger="mue_fairseq.train"):
        apply_warmup_ratio(cfg, args.warmup_ratio)
    assert (cfg.lr_scheduler.total_num_update, cfg.lr_scheduler.warmup_updates) == (9, 0)
    assert re.search(r"--warmup-ratio 0\.2 has no effect without --max-epoch", caplog.text)


def test_ofa_caption_script_on_two_processes_from_an_ofa_checkpoint(data_dir, tmp_path):
    """OFA's stage-1 caption script as its launcher runs it (two processes, `--restore-file` an OFA
    checkpoint): the other rank takes the checkpoint rank 0 read, both train, rank 0 validates and saves."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    save_dir = tmp_path / "checkpoints"
    argv = caption_stage1_args(data_dir, save_dir) + ["--distributed-world-size=2"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         "-m", "mue_fairseq.cli.train", *argv],
        cwd=REPO, capture_output=True, text=True, env=_child_env(), timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Weights only load failed" not in log
    # 8 rows in batches of 8: one batch, so one per process at most; 5 updates over --max-epoch 5
    assert [int(r["num_updates"]) for r in log_records(log, "train")] == [1, 2], log[-3000:]
    assert any("cider" in record for record in log_records(log, "valid"))
    saved = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["optimizer_history"][-1]["num_updates"] == 2
    assert saved["cfg"]["distributed_training"]["distributed_world_size"] == 2
