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
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import torch
from fairseq import metrics, search
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
    strict_images: bool = field(
        default=False,
        metadata={"help": "a truncated image is an error naming its row (default: it loads as far as its "
                  "data goes, as in OFA, with a warning, and is counted in the results)"},
    )


# Sequence-generator keyword <- (generation option, value when the option is absent)
_GENERATION_OPTIONS = (
    ("beam_size", "beam", 5),
    ("max_len_a", "max_len_a", 0),
    ("max_len_b", "max_len_b", 200),
    ("min_len", "min_len", 1),
    ("len_penalty", "lenpen", 1),
    ("unk_penalty", "unkpen", 0),
    ("temperature", "temperature", 1.0),
    ("match_source_len", "match_source_len", False),
    ("no_repeat_ngram_size", "no_repeat_ngram_size", 0),
)


# Search options of fairseq's generation config <- their values when absent.
_SEARCH_OPTIONS = {
    "sampling": False,
    "sampling_topk": -1,
    "sampling_topp": -1.0,
    "diverse_beam_groups": -1,
    "diverse_beam_strength": 0.5,
    "match_source_len": False,
    "diversity_rate": -1,
    "constraints": False,
}


def contiguous_batches(num_samples: int, batch_size: int) -> List[List[int]]:
    """Consecutive index chunks of ``batch_size`` covering every sample; the last may be smaller."""
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


class OFATask(FairseqTask):
    """Shared behaviour of OFA's tasks; subclasses name their ``dataset_class`` and its
    ``dataset_options``."""

    cfg: OFAConfig
    #: the `OFADataset` subclass that reads the task's rows
    dataset_class: Optional[type] = None

    def __init__(self, cfg: OFAConfig, src_dict, tgt_dict):
        super().__init__(cfg)
        if cfg.bpe not in (None, "gpt2"):
            raise ValueError(f"--bpe {cfg.bpe} is not supported by {type(self).__name__}; use gpt2")
        self.src_dict = src_dict
        self.tgt_dict = tgt_dict
        self.bpe = build_gpt2_bpe(cfg.bpe_dir)
        # Task configs saved before the option existed (every OFA checkpoint's) lack it.
        self.strict_images = bool(getattr(cfg, "strict_images", False))

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

    def load_dataset(self, split: str, epoch: int = 1, combine: bool = False, **kwargs):
        self.datasets[split] = self.dataset_class(
            split,
            self.open_tsv(split, epoch),
            self.bpe,
            self.src_dict,
            self.tgt_dict,
            patch_image_size=self.cfg.patch_image_size,
            imagenet_default_mean_and_std=self.cfg.imagenet_default_mean_and_std,
            **self.dataset_options(),
        )

    def dataset_options(self) -> Dict[str, Any]:
        """The task's keyword arguments of ``dataset_class`` besides the image options."""
        return {}

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
        *,
        max_sentences=None,
        epoch=1,
        num_shards=1, shard_id=0,
        num_workers=0, data_buffer_size=0,
        seed=1, grouped_shuffling=False, skip_remainder_batch=False,
        **size_options,
    ):
        """Batches of ``--batch-size`` consecutive rows that cover every row, as OFA batches.

        ``size_options`` (``--max-tokens``, ``--required-batch-size-multiple``, max positions, ...)
        are accepted and not applied: fairseq's size-based batching can drop a final partial batch, and
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
            dataset=dataset, collate_fn=dataset.collater, batch_sampler=batches, epoch=epoch,
            num_shards=num_shards, shard_id=shard_id,
            num_workers=num_workers, buffer_size=data_buffer_size,
            seed=seed, grouped_shuffling=grouped_shuffling,
            skip_remainder_batch=skip_remainder_batch and training,  # validation keeps its last batch
        )

    def dataset(self, split: str):
        """The loaded dataset of `split`, decoding images as `--strict-images` asks."""
        dataset = super().dataset(split)
        if hasattr(dataset, "strict_images"):
            dataset.strict_images = self.strict_images
        return dataset

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
        self.check_fits_model(cfg)
        if arch in OFA_ARCHITECTURES and any(name.startswith("mue_") for name in vars(cfg)):
            logger.info(
                "MuE options given: the %s model is built as mue_ofa (same weights; its decomposed encoder "
                "gives other outputs than OFA's until fine-tuned with the layer-wise loss, unless "
                "--mue-encoder-mode joint)", arch,
            )
            # fairseq builds the model type `_name` names; `arch` keeps the OFA size for the saved file
            cfg._name = "mue_ofa"
            cfg.arch = arch
        return super().build_model(cfg, from_checkpoint)

    def check_fits_model(self, model_cfg) -> None:
        """Refuse task options the model's position tables cannot hold, naming the option.

        fairseq-generate and fairseq-train take task options from the command line, so a checkpoint
        trained at another image size would otherwise fail deep inside an embedding lookup.
        """
        buckets = getattr(model_cfg, "image_bucket_size", None)
        side = self.cfg.patch_image_size
        if buckets is not None and patch_grid_side(side) > buckets:
            grid = patch_grid_side(side)
            raise ValueError(
                f"--patch-image-size {side} gives a {grid}x{grid} grid of image patches, but the model's image "
                f"position table is {buckets}x{buckets} (image_bucket_size {buckets}): it takes images of at most "
                f"{16 * buckets} px. Pass the --patch-image-size the checkpoint was trained with (its cfg.task)."
            )
        positions = getattr(model_cfg, "max_source_positions", None)
        if positions is not None and self.cfg.max_src_length + 2 > positions:
            raise ValueError(
                f"--max-src-length {self.cfg.max_src_length} (+ bos and eos) exceeds the model's "
                f"{positions} text positions (max_source_positions)"
            )

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
        options = {keyword: getattr(args, name, default) for keyword, name, default in _GENERATION_OPTIONS}
        options["normalize_scores"] = not getattr(args, "unnormalized", False)
        return seq_gen_cls(models, self.target_dictionary, search_strategy=search_strategy, **options, **kwargs)

    def _search_strategy(self, args, prefix_allowed_tokens_fn=None):
        """fairseq's search for the generation options: the first of the list below that applies
        (fairseq's precedence, which OFA keeps), plain beam search when none does."""
        opt = SimpleNamespace(**{name: getattr(args, name, default) for name, default in _SEARCH_OPTIONS.items()})
        if prefix_allowed_tokens_fn is None:
            prefix_allowed_tokens_fn = getattr(args, "prefix_allowed_tokens_fn", None)
        exclusive = {
            "--sampling": opt.sampling,
            "--diverse-beam-groups": opt.diverse_beam_groups > 0,
            "--match-source-len": opt.match_source_len,
            "--diversity-rate": opt.diversity_rate > 0,
        }
        if sum(bool(on) for on in exclusive.values()) > 1:
            raise ValueError(f"{', '.join(name for name, on in exclusive.items() if on)} exclude each other")
        for name, value in (("--sampling-topk", opt.sampling_topk), ("--sampling-topp", opt.sampling_topp)):
            if value >= 0 and not opt.sampling:
                raise ValueError(f"{name} requires --sampling")

        vocab = self.target_dictionary
        strategies = (
            (opt.sampling, lambda: search.Sampling(vocab, opt.sampling_topk, opt.sampling_topp)),
            (opt.diverse_beam_groups > 0,
             lambda: search.DiverseBeamSearch(vocab, opt.diverse_beam_groups, opt.diverse_beam_strength)),
            # output exactly as long as the input (tagging)
            (opt.match_source_len,
             lambda: search.LengthConstrainedBeamSearch(vocab, min_len_a=1, min_len_b=0, max_len_a=1, max_len_b=0)),
            (opt.diversity_rate > -1, lambda: search.DiverseSiblingsSearch(vocab, opt.diversity_rate)),
            (opt.constraints, lambda: search.LexicallyConstrainedBeamSearch(vocab, opt.constraints)),
            (prefix_allowed_tokens_fn, lambda: search.PrefixConstrainedBeamSearch(vocab, prefix_allowed_tokens_fn)),
        )
        for applies, build in strategies:
            if applies:
                return build()
        return search.BeamSearch(vocab)

    # -------------------------------------------------------------- misc
    def max_positions(self):
        return (self.cfg.max_source_positions, self.cfg.max_target_positions)

    @property
    def source_dictionary(self):
        """OFA's dictionary (text BPE, image codes, location bins); the target's is an equal copy."""
        return self.src_dict

    @property
    def target_dictionary(self):
        return self.tgt_dict


def patch_grid_side(image_size: int) -> int:
    """Patches per side after OFA's ResNet stem and stages 1-3 (four stride-2 steps, each rounding up)."""
    side = image_size
    for _ in range(4):
        side = (side + 1) // 2
    return side


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


def reduce_score(logging_outputs, total_key: str, count_key: str, name: str, digits: int = 4) -> None:
    """Log the metric ``name``, summed ``total_key`` / summed ``count_key``, when some row was scored."""
    if sum_logs(logging_outputs, count_key) > 0:
        metrics.log_scalar(total_key, sum_logs(logging_outputs, total_key))
        metrics.log_scalar(count_key, sum_logs(logging_outputs, count_key))
        metrics.log_derived(name, lambda meters: ratio_of_meters(meters, total_key, count_key, digits))
