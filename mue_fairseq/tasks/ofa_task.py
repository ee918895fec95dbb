"""Base of the OFA-format tasks: options, dictionary/BPE set-up, data files and batching.

Option names and defaults are OFA's, so OFA command lines work and OFA
checkpoints (whose ``cfg["task"]`` is a plain dict of these options) load.
``--data`` lists TSV files separated by commas: the training files rotate by
epoch and the last file serves every other split.
"""

import inspect
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from fairseq import search
from fairseq.data import FairseqDataset, iterators
from fairseq.dataclass import FairseqDataclass
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import FairseqTask

from mue_fairseq.data.ofa_bpe import build_gpt2_bpe, check_bpe_dir, load_ofa_dictionary
from mue_fairseq.data.tsv_file import TSVFile
from mue_fairseq.ofa.checkpoint import MUE_ARCHITECTURES, OFA_ARCHITECTURES

logger = logging.getLogger(__name__)


@dataclass
class OFAConfig(FairseqDataclass):
    data: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated TSV files: training file(s), rotated by epoch, then the "
            "validation file (also used for every split other than train)"
        },
    )
    selected_cols: Optional[str] = field(
        default=None, metadata={"help": "comma-separated indices of the TSV columns to read, in order"}
    )
    bpe: Optional[str] = field(
        default="gpt2", metadata={"help": "which BPE to use (only gpt2 is supported)"}
    )
    bpe_dir: Optional[str] = field(
        default=None, metadata={"help": "directory with dict.txt, encoder.json and vocab.bpe"}
    )
    max_source_positions: int = field(
        default=1024, metadata={"help": "max number of tokens in the source sequence"}
    )
    max_target_positions: int = field(
        default=1024, metadata={"help": "max number of tokens in the target sequence"}
    )
    max_src_length: int = field(default=128, metadata={"help": "the maximum src sequence length (words)"})
    max_tgt_length: int = field(default=30, metadata={"help": "the maximum target sequence length (words)"})
    code_dict_size: int = field(default=8192, metadata={"help": "number of <code_*> image-code tokens"})
    patch_image_size: int = field(default=480, metadata={"help": "side of the resized input image"})
    orig_patch_image_size: int = field(
        default=256, metadata={"help": "image size used in pretraining (for position interpolation)"}
    )
    num_bins: int = field(default=1000, metadata={"help": "number of <bin_*> location tokens"})
    imagenet_default_mean_and_std: bool = field(
        default=False, metadata={"help": "normalise images with ImageNet mean/std instead of 0.5/0.5"}
    )
    constraint_range: Optional[str] = field(
        default=None, metadata={"help": "'start,end': restrict generation to ids in [start, end) plus specials"}
    )


def contiguous_batches(num_samples: int, batch_size: int) -> List[List[int]]:
    """Consecutive index chunks of ``batch_size`` covering every sample; the last may be smaller."""
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


class OFATask(FairseqTask):
    """Shared behaviour of OFA's tasks; subclasses define ``load_dataset``."""

    cfg: OFAConfig

    def __init__(self, cfg: OFAConfig, src_dict, tgt_dict):
        super().__init__(cfg)
        if cfg.bpe not in (None, "gpt2"):
            raise ValueError(f"--bpe {cfg.bpe} is not supported by {type(self).__name__}; use gpt2")
        self.src_dict = src_dict
        self.tgt_dict = tgt_dict
        self.bpe = build_gpt2_bpe(cfg.bpe_dir)

    @classmethod
    def setup_task(cls, cfg: OFAConfig, **kwargs):
        check_bpe_dir(cfg.bpe_dir)
        src_dict = load_ofa_dictionary(cfg.bpe_dir, cfg.code_dict_size, cfg.num_bins)
        tgt_dict = load_ofa_dictionary(cfg.bpe_dir, cfg.code_dict_size, cfg.num_bins)
        logger.info("source dictionary: %d types", len(src_dict))
        logger.info("target dictionary: %d types", len(tgt_dict))
        return cls(cfg, src_dict, tgt_dict)

    # ------------------------------------------------------------------ data
    def data_paths(self) -> List[str]:
        paths = _split_data(self.cfg.data)
        if not paths:
            raise ValueError(f"--data is required for task {type(self).__name__}: comma-separated TSV files")
        return paths

    def data_path(self, split: str, epoch: int = 1) -> str:
        """TSV file of ``split``: training files rotate by epoch, other splits read the last file."""
        paths = self.data_paths()
        if split != "train":
            return paths[-1]
        if len(paths) < 2:
            raise ValueError(
                f"--data {self.cfg.data!r} names one file; training needs the training file(s) "
                "and then the validation file, separated by commas"
            )
        return paths[(epoch - 1) % (len(paths) - 1)]

    def open_tsv(self, split: str, epoch: int = 1) -> TSVFile:
        path = self.data_path(split, epoch)
        logger.info("%s split %s (epoch %d): %s", type(self).__name__, split, epoch, path)
        return TSVFile(path, self.cfg.selected_cols)

    def has_sharded_data(self, split: str) -> bool:
        """True when the training file changes between epochs, so fairseq reloads it each epoch."""
        return split == "train" and len(_split_data(self.cfg.data)) > 2

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        required_batch_size_multiple=1,
        seed=1,
        num_shards=1,
        shard_id=0,
        num_workers=0,
        epoch=1,
        data_buffer_size=0,
        disable_iterator_cache=False,
        skip_remainder_batch=False,
        grouped_shuffling=False,
        update_epoch_batch_itr=False,
    ):
        """Batches of ``--batch-size`` consecutive rows that cover every row, as OFA batches.

        ``--required-batch-size-multiple`` and ``--max-tokens`` are not applied:
        fairseq's size-based batching can drop a final partial batch, and
        evaluation must see every sample. fairseq shards the batches over
        workers and shuffles their order in training.
        """
        if not isinstance(dataset, FairseqDataset):
            raise TypeError(f"expected a FairseqDataset, got {type(dataset).__name__}")
        if not max_sentences:
            raise ValueError(f"{type(self).__name__} batches by row count: set --batch-size (and --batch-size-valid)")
        dataset.set_epoch(epoch)
        batches = contiguous_batches(len(dataset), max_sentences)
        training = getattr(dataset, "split", None) == "train"
        return iterators.EpochBatchIterator(
            dataset=dataset,
            collate_fn=dataset.collater,
            batch_sampler=batches,
            seed=seed,
            num_shards=num_shards,
            shard_id=shard_id,
            num_workers=num_workers,
            epoch=epoch,
            buffer_size=data_buffer_size,
            skip_remainder_batch=skip_remainder_batch and training,
            grouped_shuffling=grouped_shuffling,
        )

    # ------------------------------------------------------------ model
    def build_model(self, cfg, from_checkpoint=False):
        """Build an OFA-family model; `mue_*` options turn an OFA architecture into `mue_ofa`.

        So `--model-overrides "{'mue_image_threshold': 0.9}"` applies MuE to any OFA checkpoint.
        """
        arch = getattr(cfg, "_name", None) or getattr(cfg, "arch", None)
        if arch not in OFA_ARCHITECTURES + MUE_ARCHITECTURES:
            raise ValueError(
                f"model architecture {arch!r} is not an OFA model; the {self.__class__.__name__} task "
                f"needs one of {list(OFA_ARCHITECTURES + MUE_ARCHITECTURES)}"
            )
        if arch in OFA_ARCHITECTURES and any(name.startswith("mue_") for name in vars(cfg)):
            # fairseq builds the model type `_name` names; `arch` keeps the OFA size for the saved file
            cfg._name = "mue_ofa"
            cfg.arch = arch
        return super().build_model(cfg, from_checkpoint)

    # ------------------------------------------------------------ training
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's train step, passing ``update_num`` to criteria that take it (OFA's do)."""
        model.train()
        model.set_num_updates(update_num)
        kwargs = {"update_num": update_num} if _accepts_update_num(criterion) else {}
        with torch.autograd.profiler.record_function("forward"):
            with torch.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer)):
                loss, sample_size, logging_output = criterion(model, sample, **kwargs)
        if ignore_grad:
            loss *= 0
        with torch.autograd.profiler.record_function("backward"):
            optimizer.backward(loss)
        return loss, sample_size, logging_output

    # ---------------------------------------------------------- generation
    def build_bpe(self, args):
        """The task's GPT-2 BPE (so fairseq-generate prints text) unless another BPE is asked for."""
        name = getattr(args, "_name", None) if args is not None else None
        if name in (None, "gpt2"):
            return self.bpe
        return super().build_bpe(args)

    def generator_kwargs(self) -> Dict[str, Any]:
        """Task-specific keyword arguments of the sequence generator."""
        return {}

    def build_generator(
        self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None
    ):
        """OFA's generator (decoding from bos) with fairseq's search strategies, chosen as OFA chooses."""
        if getattr(args, "score_reference", False):
            from fairseq.sequence_scorer import SequenceScorer

            return SequenceScorer(self.target_dictionary, compute_alignment=getattr(args, "print_alignment", False))
        if getattr(args, "print_alignment", False):
            raise ValueError("--print-alignment is not supported by the OFA generator")

        from mue_fairseq.generation.sequence_generator import OFASequenceGenerator

        seq_gen_cls = seq_gen_cls or OFASequenceGenerator
        search_strategy = self._search_strategy(args, prefix_allowed_tokens_fn)
        kwargs = dict(self.generator_kwargs())
        if self.cfg.constraint_range is not None:
            if "constraint_range" not in inspect.signature(seq_gen_cls.__init__).parameters:
                raise ValueError(f"--constraint-range is not supported by {seq_gen_cls.__name__}")
            kwargs["constraint_range"] = self.cfg.constraint_range
        kwargs.update(extra_gen_cls_kwargs or {})
        return seq_gen_cls(
            models,
            self.target_dictionary,
            beam_size=getattr(args, "beam", 5),
            max_len_a=getattr(args, "max_len_a", 0),
            max_len_b=getattr(args, "max_len_b", 200),
            min_len=getattr(args, "min_len", 1),
            normalize_scores=not getattr(args, "unnormalized", False),
            len_penalty=getattr(args, "lenpen", 1),
            unk_penalty=getattr(args, "unkpen", 0),
            temperature=getattr(args, "temperature", 1.0),
            match_source_len=getattr(args, "match_source_len", False),
            no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", 0),
            search_strategy=search_strategy,
            **kwargs,
        )

    def _search_strategy(self, args, prefix_allowed_tokens_fn=None):
        sampling = getattr(args, "sampling", False)
        sampling_topk = getattr(args, "sampling_topk", -1)
        sampling_topp = getattr(args, "sampling_topp", -1.0)
        diverse_beam_groups = getattr(args, "diverse_beam_groups", -1)
        diverse_beam_strength = getattr(args, "diverse_beam_strength", 0.5)
        match_source_len = getattr(args, "match_source_len", False)
        diversity_rate = getattr(args, "diversity_rate", -1)
        constraints = getattr(args, "constraints", False)
        if prefix_allowed_tokens_fn is None:
            prefix_allowed_tokens_fn = getattr(args, "prefix_allowed_tokens_fn", None)
        exclusive = [sampling, diverse_beam_groups > 0, match_source_len, diversity_rate > 0]
        if sum(int(flag) for flag in exclusive) > 1:
            raise ValueError("--sampling, --diverse-beam-groups, --match-source-len and --diversity-rate exclude each other")
        if sampling_topk >= 0 and not sampling:
            raise ValueError("--sampling-topk requires --sampling")
        if sampling_topp >= 0 and not sampling:
            raise ValueError("--sampling-topp requires --sampling")

        tgt_dict = self.target_dictionary
        if sampling:
            return search.Sampling(tgt_dict, sampling_topk, sampling_topp)
        if diverse_beam_groups > 0:
            return search.DiverseBeamSearch(tgt_dict, diverse_beam_groups, diverse_beam_strength)
        if match_source_len:
            return search.LengthConstrainedBeamSearch(tgt_dict, min_len_a=1, min_len_b=0, max_len_a=1, max_len_b=0)
        if diversity_rate > -1:
            return search.DiverseSiblingsSearch(tgt_dict, diversity_rate)
        if constraints:
            return search.LexicallyConstrainedBeamSearch(tgt_dict, args.constraints)
        if prefix_allowed_tokens_fn:
            return search.PrefixConstrainedBeamSearch(tgt_dict, prefix_allowed_tokens_fn)
        return search.BeamSearch(tgt_dict)

    # -------------------------------------------------------------- misc
    def max_positions(self):
        return (self.cfg.max_source_positions, self.cfg.max_target_positions)

    @property
    def source_dictionary(self):
        return self.src_dict

    @property
    def target_dictionary(self):
        return self.tgt_dict


def _split_data(data: Optional[str]) -> List[str]:
    return [path.strip() for path in (data or "").split(",") if path.strip()]


def _accepts_update_num(criterion) -> bool:
    parameters = inspect.signature(criterion.forward).parameters
    return "update_num" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def sum_logs(logging_outputs, key: str):
    """Sum of ``key`` over logging outputs, moved to the CPU if a tensor."""
    result = sum(log.get(key, 0) for log in logging_outputs)
    if torch.is_tensor(result):
        result = result.cpu()
    return result


def ratio_of_meters(meters, numerator: str, denominator: str, digits: int) -> float:
    """``meters[numerator].sum / meters[denominator].sum`` rounded, for ``metrics.log_derived``."""
    value = meters[numerator].sum / meters[denominator].sum
    value = value if isinstance(value, float) else float(value)
    return round(value, digits) if math.isfinite(value) else value
