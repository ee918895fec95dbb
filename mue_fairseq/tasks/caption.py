"""Task ``caption``: OFA image captioning, validated by generation (CIDEr-D, BLEU-4).

Validation generates a caption per image with ``--eval-args`` (decoding starts
from bos), strips punctuation from hypotheses and references (the ``&&``-joined
targets of non-train rows) and logs ``_cider_score_sum``/``_cider_cnt`` and
sacrebleu's counts, reduced to ``cider`` and ``bleu`` as OFA does. A MuE model with exits is
scored at full depth under those names and with its exits as ``cider_mue`` / ``bleu_mue``, with
exit statistics (see `exit_validation`).
"""

import json
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from fairseq import metrics, utils
from fairseq.tasks import register_task

from mue_fairseq.data.caption_dataset import REFERENCE_SEPARATOR, CaptionDataset, strip_punctuation
from mue_fairseq.data.ofa_bpe import decode_tokens
from mue_fairseq.tasks.exit_validation import (
    full_depth,
    hypothesis_exit_layers,
    reduce_exit_metrics,
    validate_with_exits,
)
from mue_fairseq.tasks.ofa_task import OFAConfig, OFATask, reduce_score, sum_logs

logger = logging.getLogger(__name__)

EVAL_BLEU_ORDER = 4


@dataclass
class CaptionConfig(OFAConfig):
    eval_bleu: bool = field(default=False, metadata={"help": "evaluation with BLEU scores"})
    eval_cider: bool = field(default=False, metadata={"help": "evaluation with CIDEr scores"})
    eval_args: Optional[str] = field(
        default="{}",
        metadata={"help": 'generation args for BLEU or CIDEr scoring, e.g., \'{"beam": 4, "lenpen": 0.6}\', as JSON string'},
    )
    eval_print_samples: bool = field(default=False, metadata={"help": "print sample generations during validation"})
    eval_cider_cached_tokens: Optional[str] = field(
        default=None, metadata={"help": "path to cached document frequencies used to calculate CIDEr scores"}
    )
    scst: bool = field(default=False, metadata={"help": "Self-critical sequence training"})
    scst_args: str = field(
        default="{}", metadata={"help": "generation args for Self-critical sequence training, as JSON string"}
    )
    # Options of earlier OFA versions, kept so their checkpoints load; only the defaults are supported.
    eval_tokenized_bleu: bool = field(default=False, metadata={"help": "compute tokenized BLEU instead of sacrebleu"})
    eval_detok: str = field(default="space", metadata={"help": "detokenizer for evaluation (only 'space')"})
    eval_detok_args: Optional[str] = field(default="{}", metadata={"help": "unused (earlier OFA versions)"})
    eval_remove_bpe: Optional[str] = field(default=None, metadata={"help": "unused (earlier OFA versions)"})
    left_pad_source: bool = field(default=False, metadata={"help": "unsupported (earlier OFA versions)"})
    left_pad_target: bool = field(default=False, metadata={"help": "unsupported (earlier OFA versions)"})
    max_object_length: int = field(default=30, metadata={"help": "unused (earlier OFA versions)"})
    add_object: bool = field(default=False, metadata={"help": "unsupported (earlier OFA versions)"})


def _parse_json_option(name: str, value: Optional[str]) -> Dict:
    try:
        parsed = json.loads(value or "{}")
    except json.JSONDecodeError as err:
        raise ValueError(f"--{name.replace('_', '-')} is not valid JSON: {value!r} ({err})") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"--{name.replace('_', '-')} must be a JSON object, got {value!r}")
    return parsed


@register_task("caption", dataclass=CaptionConfig)
class CaptionTask(OFATask):
    cfg: CaptionConfig
    dataset_class = CaptionDataset

    def __init__(self, cfg: CaptionConfig, src_dict, tgt_dict):
        unsupported = [
            f"--{name.replace('_', '-')}" for name in ("left_pad_source", "left_pad_target", "add_object")
            if getattr(cfg, name, False)
        ]
        if unsupported:
            raise ValueError(f"caption task: {', '.join(unsupported)} not supported")
        if cfg.eval_detok not in (None, "space"):
            raise ValueError(f"caption task: --eval-detok {cfg.eval_detok} not supported (only 'space')")
        if cfg.eval_remove_bpe is not None:
            raise ValueError("caption task: --eval-remove-bpe not supported (GPT-2 BPE is decoded directly)")
        super().__init__(cfg, src_dict, tgt_dict)
        self.eval_args = _parse_json_option("eval_args", cfg.eval_args)
        self.scst_args = _parse_json_option("scst_args", cfg.scst_args)
        self.sequence_generator = None
        self.scst_generator = None
        self.cider_scorer = None

    def dataset_options(self) -> Dict[str, Any]:
        return {
            "max_tgt_length": self.cfg.max_tgt_length,
            "scst": self.cfg.scst,
        }

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if self.cfg.eval_bleu or self.cfg.eval_cider:
            self.sequence_generator = self.build_generator([model], Namespace(**self.eval_args))
        if self.cfg.eval_cider:
            from mue_fairseq.metrics.cider import CiderD

            # OFA's validation scorer splits the (already detokenized, punctuation-free) text on spaces.
            try:
                self.cider_scorer = CiderD(self.cfg.eval_cider_cached_tokens, tokenize=str.split)
            except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
                raise ValueError(f"--eval-cider-cached-tokens {self.cfg.eval_cider_cached_tokens}: {err}") from err
        if self.cfg.scst:
            self.scst_generator = self.build_generator([model], Namespace(**self.scst_args))
        return model

    # -------------------------------------------------------- validation
    def decode(self, tokens, unk_string: str = "<unk>") -> str:
        """Text of generated or target token ids."""
        return decode_tokens(tokens, self.bpe, self.tgt_dict, unk_string=unk_string)

    def inference_captions(self, generator, sample, model) -> Tuple[List[str], List[List[str]]]:
        """Best hypothesis and references of each sample, without punctuation."""
        return self.captions_of(self.inference_step(generator, [model], sample), sample)

    def captions_of(self, gen_out, sample) -> Tuple[List[str], List[List[str]]]:
        """Best hypothesis and references of each sample of a generated batch, without punctuation."""
        hyps, refs = [], []
        for i, hypos in enumerate(gen_out):
            # Distinct unknown markers keep <unk> from matching between hypothesis and reference.
            hyps.append(strip_punctuation(self.decode(hypos[0]["tokens"], "UNKNOWNTOKENINHYP")).strip())
            target = utils.strip_pad(sample["target"][i], self.tgt_dict.pad())
            references = self.decode(target, "UNKNOWNTOKENINREF").split(REFERENCE_SEPARATOR)
            refs.append([strip_punctuation(ref).strip() for ref in references])
        if self.cfg.eval_print_samples and hyps:
            logger.info("example hypothesis: %s", hyps[0])
            logger.info("example reference: %s", " && ".join(refs[0]))
        return hyps, refs

    def cider_scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """Per-sample CIDEr-D of ``hyps`` against ``refs``."""
        gts = {i: [ref.strip() for ref in sample_refs] for i, sample_refs in enumerate(refs)}
        res = {i: [hyp.strip()] for i, hyp in enumerate(hyps)}
        _, scores = self.cider_scorer.compute_score(gts, res)
        return np.asarray(scores, dtype=np.float64)

    def valid_step(self, sample, model, criterion):
        with full_depth(model):
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.cfg.eval_bleu or self.cfg.eval_cider:
            validate_with_exits(model, sample, self._hypotheses, self._score_logging, logging_output)
        return loss, sample_size, logging_output

    def _hypotheses(self, model, sample):
        gen_out = self.inference_step(self.sequence_generator, [model], sample)
        return (gen_out, *hypothesis_exit_layers(model, gen_out))

    def _score_logging(self, sample, gen_out, suffix: str) -> Dict[str, float]:
        return self._quality_logging(*self.captions_of(gen_out, sample), suffix)

    def _quality_logging(self, hyps: Sequence[str], refs: Sequence[Sequence[str]], suffix: str) -> Dict[str, float]:
        """BLEU statistics and CIDEr sums of a batch, keys ending with ``suffix``."""
        logging_output = {}
        if self.cfg.eval_bleu:
            stats = bleu_statistics(hyps, refs, tokenized=self.cfg.eval_tokenized_bleu)
            logging_output.update({f"{key}{suffix}": value for key, value in stats.items()})
        if self.cfg.eval_cider:
            scores = self.cider_scores(hyps, refs)
            logging_output[f"_cider_score_sum{suffix}"] = float(scores.sum())
            logging_output[f"_cider_cnt{suffix}"] = int(scores.size)
        return logging_output

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        for suffix in ("", "_mue"):
            self._reduce_quality(logging_outputs, suffix)
        reduce_exit_metrics(logging_outputs)

    def _reduce_quality(self, logging_outputs, suffix: str) -> None:
        if self.cfg.eval_bleu:
            counts = [sum_logs(logging_outputs, f"_bleu_counts_{i}{suffix}") for i in range(EVAL_BLEU_ORDER)]
            totals = [sum_logs(logging_outputs, f"_bleu_totals_{i}{suffix}") for i in range(EVAL_BLEU_ORDER)]
            if max(totals) > 0:
                metrics.log_scalar(f"_bleu_counts{suffix}", np.array(counts))
                metrics.log_scalar(f"_bleu_totals{suffix}", np.array(totals))
                metrics.log_scalar(f"_bleu_sys_len{suffix}", sum_logs(logging_outputs, f"_bleu_sys_len{suffix}"))
                metrics.log_scalar(f"_bleu_ref_len{suffix}", sum_logs(logging_outputs, f"_bleu_ref_len{suffix}"))
                metrics.log_derived(f"bleu{suffix}", _derived_bleu(suffix))
        if self.cfg.eval_cider:
            reduce_score(
                logging_outputs, f"_cider_score_sum{suffix}", f"_cider_cnt{suffix}", f"cider{suffix}", digits=3
            )


def bleu_statistics(hyps: Sequence[str], refs: Sequence[Sequence[str]], tokenized: bool = False) -> Dict[str, float]:
    """sacrebleu's corpus statistics of ``hyps`` against per-sample reference lists, as logging entries."""
    import sacrebleu

    kwargs = {"tokenize": "none"} if tokenized else {}
    bleu = sacrebleu.corpus_bleu(list(hyps), list(zip_longest(*refs)), **kwargs)
    stats = {"_bleu_sys_len": bleu.sys_len, "_bleu_ref_len": bleu.ref_len}
    for i in range(EVAL_BLEU_ORDER):
        stats[f"_bleu_counts_{i}"] = bleu.counts[i]
        stats[f"_bleu_totals_{i}"] = bleu.totals[i]
    return stats



def _derived_bleu(suffix: str):
    def bleu(meters) -> float:
        from sacrebleu.metrics import BLEU

        score = BLEU.compute_bleu(
            correct=meters[f"_bleu_counts{suffix}"].sum,
            total=meters[f"_bleu_totals{suffix}"].sum,
            sys_len=int(meters[f"_bleu_sys_len{suffix}"].sum),
            ref_len=int(meters[f"_bleu_ref_len{suffix}"].sum),
            smooth_method="exp",
        )
        return round(score.score, 2)

    return bleu
