"""Argument lists of OFA's `train_caption_stage2_base.sh` (SCST) and `train_caption_stage1_el.sh`
(encouraging loss), OFA-Sys/OFA at a36b91ce, variable by variable, with only what a CPU machine
forces changed: paths (the built-in synthetic data, the BPE files, the plugin, a tiny OFA-trained
checkpoint), that checkpoint's model options, smaller images, `--cpu` instead of fp16, `--max-update 2`.

Shared by tests/test_scst.py (our `python -m mue_fairseq.cli.train`) and
tools/ofa_harness/record_scst_fixtures.py (OFA's own train.py, which takes the same list with its
own `--user-dir` and BPE directory).
"""
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[1]
# Model options of ../shared/ofa_reference/ofa_tiny_caption.pt that OFA's scripts leave to --arch.
TINY_CAPTION_MODEL = ["--encoder-embed-dim=32", "--encoder-ffn-embed-dim=128", "--encoder-layers=2",
                      "--decoder-layers=2", "--encoder-attention-heads=4", "--decoder-attention-heads=4",
                      "--resnet-type=resnet18", "--image-bucket-size=16"]
# CPU machine: --cpu for fp16, the tiny fixture's model, two updates.
CPU_CHANGES = ["--cpu", *TINY_CAPTION_MODEL, "--max-update=2"]


def caption_stage2_args(data_dir: Path, save_dir: Path, restore_file: Path, bpe_dir: Path,
                        user_dir: Path) -> List[str]:
    """run_scripts/caption/train_caption_stage2_base.sh (its loops set lr 1e-5, max_epoch 3)."""
    data = f"{data_dir}/caption_stage2_train.tsv,{data_dir}/caption_valid.tsv"
    selected_cols = "1,4,2"
    task, arch, criterion = "caption", "ofa_base", "scst_reward_criterion"
    lr, max_epoch, warmup_ratio, batch_size, update_freq = 1e-5, 3, 0.06, 2, 4
    resnet_drop_path_rate, encoder_drop_path_rate, decoder_drop_path_rate = 0.0, 0.0, 0.0
    dropout, attention_dropout, max_src_length, max_tgt_length, num_bins = 0.0, 0.0, 80, 20, 1000
    patch_image_size = 64  # OFA: 480
    eval_cider_cached = f"{data_dir}/cider_cached_tokens/coco-valid-words.p"
    scst_cider_cached = f"{data_dir}/cider_cached_tokens/coco-train-words.p"
    save_path = save_dir
    return [
        data, f"--selected-cols={selected_cols}", f"--bpe-dir={bpe_dir}", f"--user-dir={user_dir}",
        f"--restore-file={restore_file}", "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        f"--save-dir={save_path}", f"--task={task}", f"--arch={arch}", f"--criterion={criterion}",
        f"--batch-size={batch_size}", f"--update-freq={update_freq}",
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
        f"--patch-image-size={patch_image_size}", "--scst", f"--scst-cider-cached-tokens={scst_cider_cached}",
        '--scst-args={"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}',
        "--fp16-scale-window=512", "--num-workers=0",
        *CPU_CHANGES,
    ]


def caption_stage1_el_args(data_dir: Path, save_dir: Path, restore_file: Path, bpe_dir: Path,
                           user_dir: Path) -> List[str]:
    """run_scripts/caption/train_caption_stage1_el.sh (its loops set max_epoch 2, warmup_ratio 0.06,
    drop_worst_after 2500); `--arch ofa_base` for its ofa_large, as the checkpoint is OFA-Base-shaped."""
    data = f"{data_dir}/caption_train.tsv,{data_dir}/caption_valid.tsv"
    selected_cols = "0,4,2"
    task, arch, criterion = "caption", "ofa_base", "adjust_label_smoothed_encouraging_loss"
    label_smoothing, lr, max_epoch, warmup_ratio, batch_size, update_freq = 0.1, 1e-5, 2, 0.06, 8, 4
    resnet_drop_path_rate, encoder_drop_path_rate, decoder_drop_path_rate = 0.0, 0.1, 0.1
    dropout, attention_dropout, max_src_length, max_tgt_length, num_bins = 0.1, 0.0, 80, 20, 1000
    patch_image_size = 64  # OFA: 480
    eval_cider_cached = f"{data_dir}/cider_cached_tokens/coco-valid-words.p"
    drop_worst_ratio, drop_worst_after, log_end = 0.05, 2500, 0.75
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
        f"--drop-worst-after={drop_worst_after}", "--log-end", f"{log_end}",
        "--fp16-scale-window=512", "--num-workers=0",
        *CPU_CHANGES,
    ]


# What the recorded comparison (tests/fixtures/ofa_*_updates.pt) changes on top: no random dropout
# (its masks depend on the torch version and call order); a warm-up ratio that makes one update of
# warm-up (OFA's scheduler divides by zero when the ratio gives none: 3 and 2 updates in all here);
# for the encouraging loss, the worst tokens dropped from the second update on, and OFA's
# --drop-best-* options set (they have no effect in OFA's criterion: the recording shows it).
DETERMINISTIC = ["--dropout=0.0", "--encoder-drop-path-rate=0.0", "--decoder-drop-path-rate=0.0"]
SCST_RECORDED = [*DETERMINISTIC, "--warmup-ratio=0.34"]
EL_RECORDED = [*DETERMINISTIC, "--warmup-ratio=0.5", "--drop-worst-after=0", "--drop-best-ratio=0.25",
               "--drop-best-after=0"]
