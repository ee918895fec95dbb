"""Train with OFA's `train.py` command line: fairseq's own trainer, plus what OFA's fork adds to it.

    python -m mue_fairseq.cli.train train.tsv,valid.tsv --task caption --arch ofa_base \
        --restore-file ofa_base.pt --reset-optimizer --reset-dataloader --reset-meters \
        --criterion adjust_label_smoothed_cross_entropy --lr-scheduler polynomial_decay --lr 1e-5 \
        --max-epoch 5 --warmup-ratio 0.06 --batch-size 8 --update-freq 4 ...

OFA's run scripts run unchanged with `../../train.py` replaced by `-m mue_fairseq.cli.train` and
`--user-dir` pointing at `mue_fairseq` (or left out). Training is `fairseq_cli.train.main`; this
entry point only prepares its configuration:

* `--warmup-ratio R` (OFA's `polynomial_decay` option). As in OFA's `train.py`, with `--max-epoch E`
  the learning rate decays over the updates of E epochs, ``sum(ceil(B / update_freq[e]))`` where B
  is the number of batches each process gets per epoch, and warms up over ``int(R * total)`` of
  them; these replace `--total-num-update` and `--warmup-updates`, and `--max-update` does not
  enter (a run stopped by it ends part-way down the schedule, as in OFA). B comes from the task's
  own batching of the first epoch's training file, so each process reads that file once more at
  start-up. Where OFA divides by a warm-up of 0 updates (a ratio under one update), this warms
  up over none.
* `--total-num-update` may be left out: `--max-update` when set, else OFA's default 1,000,000
  (fairseq's default, `--max-update`, makes the scheduler fail when `--max-update` is unset).
* the data argument of OFA's tasks lists TSV files (training file(s), then the validation file),
  so fairseq's search for unused `valid*` files in a data directory does not apply to them.
* OFA's own `--user-dir` (`ofa_module`) is named in the error.
"""
import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from fairseq import options, tasks
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import convert_namespace_to_omegaconf, gen_parser_from_dataclass
from fairseq.distributed import utils as distributed_utils

import mue_fairseq
from mue_fairseq import distributed_cpu
from mue_fairseq.tasks.ofa_task import OFATask

logger = logging.getLogger("mue_fairseq.train")

PLUGIN_DIR = os.path.dirname(os.path.abspath(mue_fairseq.__file__))
# polynomial_decay's decay length in OFA's fork when neither it nor a warm-up ratio sets one.
OFA_TOTAL_NUM_UPDATE = 1_000_000


@dataclass
class OFATrainConfig(FairseqDataclass):
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "OFA's polynomial_decay warm-up: with --max-epoch, decay over the updates of "
            "--max-epoch epochs and warm up over this fraction of them (replaces --total-num-update "
            "and --warmup-updates); 0 = off"
        },
    )


def add_ofa_train_args(parser: argparse.ArgumentParser) -> None:
    gen_parser_from_dataclass(parser.add_argument_group("OFA train.py"), OFATrainConfig())


def epochs_total_updates(batches_per_epoch: int, max_epoch: int, update_freq: Sequence[int]) -> int:
    """Updates over `max_epoch` epochs of `batches_per_epoch` batches, epoch e grouping
    `update_freq[e]` batches per update (the last entry holds for later epochs), as OFA counts them."""
    if batches_per_epoch < 1 or max_epoch < 1 or not update_freq:
        raise ValueError(f"need >= 1 batch, epoch and --update-freq entry, got {batches_per_epoch}, "
                         f"{max_epoch}, {list(update_freq)}")
    return sum(math.ceil(batches_per_epoch / update_freq[min(epoch, len(update_freq) - 1)])
               for epoch in range(max_epoch))


def warmup_schedule(batches_per_epoch: int, max_epoch: int, update_freq: Sequence[int],
                    warmup_ratio: float) -> Tuple[int, int]:
    """(total updates, warm-up updates) of OFA's `--warmup-ratio`."""
    total = epochs_total_updates(batches_per_epoch, max_epoch, update_freq)
    return total, int(total * warmup_ratio)


def train_batches_per_epoch(cfg, num_shards: int = 1, shard_id: int = 0) -> int:
    """Batches of one epoch of the training split that one of `num_shards` processes gets, from the
    task's own batching (as fairseq's trainer asks for it)."""
    task = tasks.setup_task(cfg.task)
    split = cfg.dataset.train_subset
    task.load_dataset(split, epoch=1, combine=False)
    batches = task.get_batch_iterator(
        dataset=task.dataset(split),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        max_positions=task.max_positions(),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=cfg.dataset.required_batch_size_multiple,
        seed=cfg.common.seed,
        num_shards=num_shards,
        shard_id=shard_id,
        epoch=1,
        skip_remainder_batch=cfg.optimization.skip_remainder_batch,
    )
    return len(batches)


def apply_warmup_ratio(cfg, warmup_ratio: float, num_shards: int = 1, shard_id: int = 0) -> None:
    """Set polynomial_decay's total and warm-up updates in `cfg` from `warmup_ratio`, as OFA does."""
    max_epoch = cfg.optimization.max_epoch
    if not max_epoch:
        logger.warning("--warmup-ratio %s has no effect without --max-epoch (OFA counts the schedule "
                       "in epochs): no warm-up, decay over %s updates", warmup_ratio,
                       cfg.lr_scheduler.total_num_update)
        return
    batches = train_batches_per_epoch(cfg, num_shards, shard_id)
    total, warmup = warmup_schedule(batches, max_epoch, list(cfg.optimization.update_freq), warmup_ratio)
    logger.info("--warmup-ratio %s: %d batches per process and epoch, %d epochs, --update-freq %s: "
                "total %d updates, warm-up %d updates", warmup_ratio, batches, max_epoch,
                list(cfg.optimization.update_freq), total, warmup)
    cfg.lr_scheduler.total_num_update = total
    cfg.lr_scheduler.warmup_updates = warmup


def main(cfg, warmup_ratio: float = 0.0) -> None:
    """fairseq's training main, in each process, after the schedule is derived for that process."""
    distributed_cpu.install()  # again here: a spawned process starts without it
    configure_logging(logging.getLogger().getEffectiveLevel())  # fairseq quiets ranks other than 0
    if warmup_ratio > 0:
        num_shards, shard_id = 1, 0
        if distributed_utils.get_global_group() is not None:
            num_shards = distributed_utils.get_data_parallel_world_size()
            shard_id = distributed_utils.get_data_parallel_rank()
        apply_warmup_ratio(cfg, warmup_ratio, num_shards, shard_id)
    import fairseq_cli.train

    fairseq_cli.train.main(cfg)


def check_ofa_only_options(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> None:
    """Name OFA's own plugin directory, which needs OFA's fairseq fork, instead of an import failure."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--user-dir")
    known, _ = pre.parse_known_args(argv)
    if known.user_dir and os.path.basename(os.path.normpath(known.user_dir)) == "ofa_module":
        parser.error(f"--user-dir {known.user_dir} is OFA's own plugin (it needs OFA's fairseq fork); "
                     f"use --user-dir {PLUGIN_DIR}, or leave --user-dir out")


def prepare_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What OFA's train.py accepts and fairseq's parser leaves unusable, made usable in `args`."""
    if args.user_dir is None:
        args.user_dir = PLUGIN_DIR  # spawned processes and saved checkpoints name the plugin
    if args.warmup_ratio < 0 or args.warmup_ratio >= 1:
        parser.error(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.lr_scheduler != "polynomial_decay":
        if args.warmup_ratio > 0:
            parser.error(f"--warmup-ratio is an option of --lr-scheduler polynomial_decay, not {args.lr_scheduler}")
        return
    derived = args.warmup_ratio > 0 and args.max_epoch > 0
    if derived and (args.total_num_update is not None or args.warmup_updates > 0):
        logger.warning("--warmup-ratio %s with --max-epoch %d sets the total and warm-up updates from the "
                       "epoch length (as OFA's train.py does): --total-num-update %s and --warmup-updates %d "
                       "are not used", args.warmup_ratio, args.max_epoch, args.total_num_update, args.warmup_updates)
    if args.total_num_update is None:
        # Replaced in each process when derived; otherwise fairseq's intent, then OFA's default.
        args.total_num_update = args.max_update if args.max_update > 0 else OFA_TOTAL_NUM_UPDATE
        if not derived:
            logger.info("polynomial_decay: --total-num-update not given, decaying over %d updates%s",
                        args.total_num_update, " (--max-update)" if args.max_update > 0 else " (OFA's default)")


def skips_valid_file_search(task_name: str) -> bool:
    """True for tasks whose data argument lists files: fairseq's check for unused `valid*` files
    lists the data directory, which a comma-joined list of TSV files is not."""
    task_cls = tasks.TASK_REGISTRY.get(task_name)
    return isinstance(task_cls, type) and issubclass(task_cls, OFATask)


def parse_train_args(argv: Optional[List[str]] = None):
    """(args, cfg) of a training command line in OFA's form (`argv` None: the process's own)."""
    parser = options.get_training_parser()
    add_ofa_train_args(parser)
    check_ofa_only_options(parser, sys.argv[1:] if argv is None else argv)
    args = options.parse_args_and_arch(parser, argv)
    prepare_args(args, parser)
    cfg = convert_namespace_to_omegaconf(args)
    if skips_valid_file_search(cfg.task._name):
        cfg.dataset.ignore_unused_valid_subsets = True
    return args, cfg


def configure_logging(level: Optional[int] = None) -> None:
    """fairseq-train's log format, and its level unless given (fairseq's imports configure the root
    logger before)."""
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", level=level or os.environ.get("LOGLEVEL", "INFO").upper(),
                        stream=sys.stdout, force=True)


def cli_main(argv: Optional[List[str]] = None) -> None:
    configure_logging()
    distributed_cpu.install()
    args, cfg = parse_train_args(argv)
    distributed_utils.call_main(cfg, main, warmup_ratio=args.warmup_ratio)


if __name__ == "__main__":
    cli_main()
