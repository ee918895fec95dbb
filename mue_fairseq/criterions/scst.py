"""OFA's caption stage 2, `scst_reward_criterion`: self-critical sequence training with a CIDEr-D reward.

Each step (OFA's definition, `criterions/scst_loss.py` at a36b91ce):

1. the caption task's ``--scst`` generator (``--scst-args``, e.g. beam 5) decodes K captions per
   image, in evaluation mode and without gradients;
2. each caption is scored by CIDEr-D against that image's references (the ``&&``-joined targets of
   the stage-2 TSV) with the document frequencies of ``--scst-cider-cached-tokens`` (OFA's
   ``coco-train-words.p``); hypotheses and references lose their punctuation and end with the word
   ``<eos>``, as the cached n-grams do, and are split on spaces;
3. the reward of a caption is its score minus the mean score of the image's K - 1 other captions;
4. the loss is ``-sum_t log p(y_t | y_<t, image) * reward`` over the caption's tokens (eos
   included, padding not), computed in float64 as OFA's is, from a teacher-forced pass over the
   sampled captions in the mode the trainer set (training: dropout as configured).

Logged as OFA: ``loss`` (per token, or per caption with ``--sentence-avg``), ``score`` (mean
CIDEr-D of the sampled captions), ``ntokens``, ``nsentences`` (captions), ``sample_size``.

Deliberate differences from OFA's code, where its result is an error or a side effect:
``--ignore-prefix-size N`` drops the first N positions of every caption (OFA's drops the first N
captions of the batch and then fails on the reward's shape); the teacher-forced pass runs in the
mode the trainer set (OFA switches to training mode also in validation, which updates the ResNet's
BatchNorm statistics with validation images).

Checked against OFA's own train.py (tests/test_scst.py, updates recorded by
tools/ofa_harness/record_scst_fixtures.py): the same beam samples, CIDEr-D scores and rewards, and
the same losses, gradient norms and weights up to float32 rounding.
"""
import math
import string
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.data import data_utils
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor

from mue_fairseq.criterions.label_smoothed_ce import SPECIAL_IDS, parse_constraint_range, summed_log
from mue_fairseq.data.caption_dataset import REFERENCE_SEPARATOR
from mue_fairseq.data.ofa_bpe import decode_tokens
from mue_fairseq.metrics.cider import CIDER_EOS, CiderD
from mue_fairseq.tasks.exit_validation import full_depth

_PUNCTUATION_TABLE = str.maketrans({char: None for char in string.punctuation})


@dataclass
class ScstRewardCriterionConfig(FairseqDataclass):
    scst_cider_cached_tokens: str = field(
        default="coco-train-words.p",
        metadata={
            "help": "OFA's cached CIDEr-D document frequencies of the training references (a pickle "
            "{'document_frequency': {ngram: count}, 'ref_len': number of images}, e.g. "
            "cider_cached_tokens/coco-train-words.p)"
        },
    )
    ignore_prefix_size: int = field(
        default=0, metadata={"help": "leave the first N positions of every sampled caption out of the loss"}
    )
    sentence_avg: bool = II("optimization.sentence_avg")
    constraint_range: Optional[str] = field(
        default=None,
        metadata={"help": "'start,end': only ids 0-3 and [start, end) may be predicted (others get -inf)"},
    )


def cider_sentence(text: str) -> str:
    """``text`` as OFA's SCST scores it: no punctuation, ending with the word ``<eos>``."""
    return text.strip().translate(_PUNCTUATION_TABLE).strip() + " " + CIDER_EOS


def self_critical_rewards(scores: np.ndarray, samples_per_image: int) -> np.ndarray:
    """Each sample's score minus the mean score of the other samples of its image.

    ``scores`` holds the samples image by image, ``samples_per_image`` (>= 2) consecutive ones each.
    """
    if samples_per_image < 2:
        raise ValueError(f"the self-critical baseline needs >= 2 samples per image, got {samples_per_image}")
    if scores.size % samples_per_image:
        raise ValueError(f"{scores.size} scores are not {samples_per_image} per image")
    grid = np.asarray(scores, dtype=np.float64).reshape(-1, samples_per_image)
    baseline = (grid.sum(1, keepdims=True) - grid) / (samples_per_image - 1)
    return (grid - baseline).reshape(-1)


def scst_loss(lprobs: Tensor, target: Tensor, reward: Tensor, pad_idx: int, reduce: bool = True) -> Tuple[Tensor, int]:
    """(``-sum log p(target) * reward``, number of non-pad target tokens).

    ``lprobs``: B x T x V, ``target``: B x T, ``reward``: B (float64, so the loss is float64 as OFA's).
    """
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = nll * reward.unsqueeze(-1)
    pad = target.eq(pad_idx)
    loss = loss.masked_fill(pad, 0.0)
    ntokens = int((~pad).sum())
    return (loss.sum() if reduce else loss), ntokens


@register_criterion("scst_reward_criterion", dataclass=ScstRewardCriterionConfig)
class ScstRewardCriterion(FairseqCriterion):
    """Self-critical sequence training: CIDEr-D of beam samples against a leave-one-out baseline."""

    def __init__(
        self,
        task,
        scst_cider_cached_tokens: str,
        sentence_avg: bool,
        ignore_prefix_size: int = 0,
        constraint_range: Optional[str] = None,
    ):
        super().__init__(task)
        if not getattr(getattr(task, "cfg", None), "scst", False):
            raise ValueError(
                "--criterion scst_reward_criterion samples captions with the caption task's SCST generator: "
                "add --scst (and --scst-args, e.g. '{\"beam\":5,\"max_len_b\":16}')"
            )
        if ignore_prefix_size < 0:
            raise ValueError(f"--ignore-prefix-size must be >= 0, got {ignore_prefix_size}")
        try:
            self.cider = CiderD(scst_cider_cached_tokens, tokenize=str.split)
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"--scst-cider-cached-tokens {scst_cider_cached_tokens}: {err}") from err
        self.sentence_avg = sentence_avg
        self.ignore_prefix_size = ignore_prefix_size
        self.constraint_range = parse_constraint_range(constraint_range)

    # ------------------------------------------------------------------ forward
    def forward(self, model, sample, update_num: int = 0, reduce: bool = True):
        """(loss, sample_size, logging_output) of one batch of images."""
        tokens, scores, rewards = self.sampled_rewards(model, sample)
        target = sample["target"]
        reward = torch.as_tensor(rewards, dtype=torch.float64, device=target.device)
        lprobs, gen_target = self.sample_lprobs(model, sample, tokens)
        loss, ntokens = scst_loss(lprobs, gen_target, reward, self.padding_idx, reduce=reduce)
        return self.batch_result(loss, scores, ntokens, gen_target.size(0))

    def sampled_rewards(self, model, sample) -> Tuple[List[Tensor], np.ndarray, np.ndarray]:
        """(token ids, CIDEr-D score and self-critical reward) of every sampled caption, image by image."""
        tokens, hyps, refs = self.sample_captions(model, sample)
        scores = self.cider_scores(hyps, refs)
        return tokens, scores, self_critical_rewards(scores, len(hyps) // len(refs))

    def batch_result(self, loss: Tensor, scores: np.ndarray, ntokens: int, nsentences: int):
        """(loss, sample_size, logging_output) of a batch of ``nsentences`` sampled captions."""
        sample_size = nsentences if self.sentence_avg else ntokens
        logging_output = {
            "loss": loss.data,
            "score": float(scores.sum()),
            "ntokens": ntokens,
            "nsentences": nsentences,
            "sample_size": sample_size,
        }
        return loss, sample_size, logging_output

    def decode(self, tokens: Tensor) -> str:
        return decode_tokens(tokens, self.task.bpe, self.task.target_dictionary).strip()

    def sample_captions(self, model, sample) -> Tuple[List[Tensor], List[str], List[List[str]]]:
        """(token ids, text) of every sampled caption, image by image, and each image's references."""
        generator = getattr(self.task, "scst_generator", None)
        if generator is None:
            raise RuntimeError("the caption task built no SCST generator (--scst is set, but no model was built?)")
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.sampling_depth(model):
                gen_out = generator.generate([model], sample)
        finally:
            model.train(training)
        counts = {len(hypos) for hypos in gen_out}
        if len(counts) != 1 or min(counts) < 2:
            raise ValueError(
                f"--scst-args {self.task.cfg.scst_args}: the self-critical baseline needs the same number (>= 2) "
                f"of sampled captions for every image, got {sorted(counts)} (set beam >= 2)"
            )
        tokens, hyps, refs = [], [], []
        for i, hypos in enumerate(gen_out):
            for hypo in hypos:
                tokens.append(hypo["tokens"].cpu())
                hyps.append(self.decode(hypo["tokens"]))
            target = utils.strip_pad(sample["target"][i], self.padding_idx)
            refs.append(self.decode(target).split(REFERENCE_SEPARATOR))
        return tokens, hyps, refs

    def sampling_depth(self, model):
        """The depth the captions are sampled at: full depth (every MuE exit off), as OFA's model has."""
        return full_depth(model)

    def cider_scores(self, hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each caption (``len(hyps) // len(refs)`` per image) against its image's references."""
        per_image = len(hyps) // len(refs)
        wrapped_refs = [[cider_sentence(ref) for ref in image_refs] for image_refs in refs]
        res = {i: [cider_sentence(hyp)] for i, hyp in enumerate(hyps)}
        gts = {i: wrapped_refs[i // per_image] for i in range(len(hyps))}
        _, scores = self.cider.compute_score(gts, res)
        return np.asarray(scores, dtype=np.float64)

    def sampled_batch(self, sample, tokens: List[Tensor]) -> Tuple[Dict[str, Any], Tensor]:
        """The model input that teacher-forces the sampled captions (each image's input repeated for its
        samples), and the captions as targets (B x T)."""
        device = sample["target"].device
        per_image = len(tokens) // sample["target"].size(0)
        dictionary = self.task.target_dictionary
        target = data_utils.collate_tokens(tokens, self.padding_idx, eos_idx=dictionary.eos()).to(device).long()
        prev_output_tokens = data_utils.collate_tokens(
            tokens, self.padding_idx, eos_idx=dictionary.bos(), move_eos_to_beginning=True
        ).to(device).long()
        net_input = repeat_net_input(sample["net_input"], per_image, sample["target"].size(0))
        net_input["prev_output_tokens"] = prev_output_tokens
        return net_input, target

    def log_probs(self, model, logits: Tensor) -> Tensor:
        """Log-probabilities of ``logits`` (... x V), ids outside ``--constraint-range`` excluded."""
        if self.constraint_range is not None:
            start, end = self.constraint_range
            logits = logits.clone()
            logits[..., len(SPECIAL_IDS) : start] = -math.inf
            logits[..., end:] = -math.inf
        return model.get_normalized_probs((logits, None), log_probs=True)

    def sample_lprobs(self, model, sample, tokens: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """Log-probabilities (B x T x V) of teacher-forcing the sampled captions, and their targets (B x T)."""
        net_input, target = self.sampled_batch(sample, tokens)
        with full_depth(model):
            net_output = model(**net_input)
        lprobs = self.log_probs(model, net_output[0])
        if self.ignore_prefix_size > 0:
            lprobs = lprobs[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        return lprobs, target

    # ------------------------------------------------------------------ metrics
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Loss per token (or caption), mean CIDEr-D of the samples, and the counts, as OFA logs them."""
        keys = ("loss", "score", "ntokens", "nsentences", "sample_size")
        total = {key: summed_log(logging_outputs, key) for key in keys}
        metrics.log_scalar("loss", total["loss"] / total["sample_size"], total["sample_size"], round=3)
        metrics.log_scalar("score", total["score"] / total["nsentences"], total["nsentences"], round=3)
        for key in ("ntokens", "nsentences", "sample_size"):
            metrics.log_scalar(key, total[key], 1, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def repeat_net_input(net_input: Dict[str, Any], times: int, batch_size: int) -> Dict[str, Any]:
    """``net_input`` with every per-sample tensor repeated ``times`` times, each sample's copies adjacent."""
    repeated = {}
    for key, value in net_input.items():
        if torch.is_tensor(value) and value.dim() > 0 and value.size(0) == batch_size:
            value = value.repeat_interleave(times, dim=0)
        repeated[key] = value
    return repeated
