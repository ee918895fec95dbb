"""OFA's `adjust_label_smoothed_encouraging_loss` (the `*_el` run scripts), re-implemented.

The encouraging loss (Zhao et al., "Well-classified examples are underestimated in classification
with deep neural networks") adds to OFA's label-smoothed cross-entropy a bonus for probability
already given to the target: with ``p`` a token's probability,

    bonus(p) = log(max(1 - p, 1e-5))                              for p <= log_end
             = log(1 - log_end) - (p - log_end) / (1 - log_end)   for p >  log_end (its tangent)

(``--log-end 1`` keeps the logarithm everywhere), and the loss gains, over the kept target
tokens, ``(1 - eps) * bonus(p_target) + eps / V * sum_v bonus(p_v)`` (V the vocabulary size).

Tokens are kept as in OFA's criterion: padding, an ignored prefix and ignored eos are left out;
after ``--drop-worst-after`` updates the ``--drop-worst-ratio`` share of tokens with the largest
smoothed loss is dropped; the bonus is computed on the tokens that remain. Everything else
(constraints, ``conf``, ``--report-accuracy``, logging) is `adjust_label_smoothed_cross_entropy`'s.

``--drop-best-ratio`` and ``--drop-best-after`` are OFA's options and, as in OFA, change nothing:
OFA's criterion never passes them to its loss function, whose own defaults (ratio 0) keep every
token (a recorded OFA update with ``--drop-best-ratio 0.25`` kept them all). A ratio above 0 is
warned about.

Not supported: ``--use-rdrop`` (OFA's loses the pairing of the two copies: its loss function
reorders the tokens by loss at every update after the first).
"""
import logging
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.criterions import register_criterion
from torch import Tensor

from .label_smoothed_ce import (
    AdjustLabelSmoothedCrossEntropyConfig,
    AdjustLabelSmoothedCrossEntropyCriterion,
    LossTerms,
    TokenSelection,
    label_smoothed_nll_loss,
    worst_dropped_indices,
)

logger = logging.getLogger(__name__)


@dataclass
class AdjustLabelSmoothedEncouragingLossConfig(AdjustLabelSmoothedCrossEntropyConfig):
    log_end: float = field(
        default=0.75,
        metadata={
            "help": "probability above which the bonus log(1 - p) continues as its tangent (1: never); "
            "higher for better-performing models, 0.75 or 0.5 to start with"
        },
    )
    drop_best_ratio: float = field(
        default=0.0, metadata={"help": "OFA's option, without effect in OFA's criterion and here"}
    )
    drop_best_after: int = field(
        default=0, metadata={"help": "OFA's option, without effect in OFA's criterion and here"}
    )


def encouraging_bonus(probs: Tensor, log_end: float) -> Tensor:
    """The bonus log(1 - p), continued linearly above ``log_end`` (clamped at log(1e-5))."""
    bonus = torch.log(torch.clamp(1.0 - probs, min=1e-5))
    if log_end != 1.0:
        tangent = (probs - log_end) / (log_end - 1.0) + torch.log(torch.ones_like(probs) - log_end)
        bonus = torch.where(probs > log_end, tangent, bonus)
    return bonus


@register_criterion("adjust_label_smoothed_encouraging_loss", dataclass=AdjustLabelSmoothedEncouragingLossConfig)
class AdjustLabelSmoothedEncouragingLossCriterion(AdjustLabelSmoothedCrossEntropyCriterion):
    """OFA's label-smoothed cross-entropy plus the encouraging bonus of the kept tokens."""

    def __init__(
        self,
        task,
        sentence_avg: bool,
        label_smoothing: float,
        ignore_prefix_size: int = 0,
        ignore_eos: bool = False,
        report_accuracy: bool = False,
        drop_worst_ratio: float = 0.0,
        drop_worst_after: int = 0,
        use_rdrop: bool = False,
        reg_alpha: float = 1.0,
        sample_patch_num: int = 196,
        constraint_range: Optional[str] = None,
        log_end: float = 0.75,
        drop_best_ratio: float = 0.0,
        drop_best_after: int = 0,
    ):
        super().__init__(
            task, sentence_avg, label_smoothing, ignore_prefix_size=ignore_prefix_size, ignore_eos=ignore_eos,
            report_accuracy=report_accuracy, drop_worst_ratio=drop_worst_ratio, drop_worst_after=drop_worst_after,
            use_rdrop=use_rdrop, reg_alpha=reg_alpha, sample_patch_num=sample_patch_num,
            constraint_range=constraint_range,
        )
        if use_rdrop:
            raise ValueError("--use-rdrop is not supported by adjust_label_smoothed_encouraging_loss")
        if not 0 < log_end <= 1:
            raise ValueError(f"--log-end must be in (0, 1], got {log_end}")
        if not 0 <= drop_best_ratio < 1:
            raise ValueError(f"--drop-best-ratio must be in [0, 1), got {drop_best_ratio}")
        if drop_best_ratio > 0:
            logger.warning("--drop-best-ratio %s has no effect: OFA's encouraging loss never applies it, and "
                           "neither does this one", drop_best_ratio)
        self.log_end = log_end
        logger.info("encouraging loss: --log-end %s", log_end)

    def token_losses(self, model, logits: Tensor, selection: TokenSelection, update_num: int) -> List[LossTerms]:
        """Summed loss terms of each prediction in ``logits`` (L x n x V), one per leading index."""
        logits = self.constrain_logits(logits, selection)
        lprobs = model.get_normalized_probs((logits, None), log_probs=True)
        if selection.conf is not None:
            lprobs = lprobs * selection.conf.unsqueeze(-1).to(lprobs)
        constraint_ids = self.constraint_ids(lprobs.device) if selection.constraint_masks is None else None
        loss, nll = label_smoothed_nll_loss(
            lprobs, selection.target, self.eps, selection.constraint_masks, constraint_ids
        )
        with torch.no_grad():
            n_correct = logits.argmax(-1).eq(selection.target).sum(-1)
        target = selection.target.expand_as(loss)
        if self.drop_worst_ratio > 0 and update_num > self.drop_worst_after:
            kept = worst_dropped_indices(loss, self.drop_worst_ratio, paired=False)
            loss, nll, target = loss.gather(-1, kept), nll.gather(-1, kept), target.gather(-1, kept)
            lprobs = lprobs.gather(-2, kept.unsqueeze(-1).expand(*kept.shape, lprobs.size(-1)))
        bonus = encouraging_bonus(lprobs.exp(), self.log_end)
        target_bonus = bonus.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
        encouraging = target_bonus * (1 - self.eps) + (self.eps / lprobs.size(-1)) * bonus.sum((-1, -2))
        ntokens = loss.size(-1)
        return [
            LossTerms(loss[layer].sum() + encouraging[layer], nll[layer].sum(), ntokens, n_correct[layer],
                      selection.num_tokens)
            for layer in range(loss.size(0))
        ]
