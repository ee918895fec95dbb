"""OFA's training loss, `adjust_label_smoothed_cross_entropy`, re-implemented.

The registry name, option names and defaults are OFA's, so OFA checkpoints (which record
``criterion_name`` and the ``cfg["criterion"]`` section) and OFA's run scripts work as they are.
Semantics follow OFA's criterion:

* label smoothing spreads ``eps`` over the tokens a position may take: all of the
  vocabulary, the tokens a sample's ``constraint_masks`` allow, or, with
  ``--constraint-range a,b``, the ids ``0..3`` and ``a..b-1``;
* ``--drop-worst-ratio r`` keeps, once ``update_num > --drop-worst-after``, the
  ``int(n * (1 - r))`` tokens with the smallest loss (per R-Drop pair when R-Drop is on);
* ``--ignore-prefix-size`` and ``--ignore-eos`` exclude target positions; ``--use-rdrop``
  duplicates the batch and adds ``reg_alpha`` times the symmetric KL between the copies;
* a list of two samples (OFA's pretraining) is scored as the sum of their normalised losses,
  the first with ``--sample-patch-num`` patches.

Deliberate differences from OFA's code, where OFA's result is an error or NaN:
``--report-accuracy`` works (OFA's ``compute_accuracy`` fails to unpack three values),
``--ignore-eos`` works whatever the number of eos tokens per row (OFA needs exactly one),
the R-Drop KL ignores tokens both copies exclude (OFA's is NaN with constraint masks),
and ``ppl`` is ``exp(nll_loss)`` (the loss is in nats, OFA reports ``2 ** nll_loss``).

The token-level pieces (`TokenSelection`, `token_losses`) are shared with the layer-wise
criterion, which applies them to every decoder layer's prediction.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from fairseq import utils
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass
from fairseq.logging import metrics
from omegaconf import II
from torch import Tensor

# Ids always allowed by --constraint-range: <s>, <pad>, </s>, <unk>.
SPECIAL_IDS = (0, 1, 2, 3)


@dataclass
class AdjustLabelSmoothedCrossEntropyConfig(FairseqDataclass):
    label_smoothing: float = field(
        default=0.0, metadata={"help": "epsilon for label smoothing, 0 means no label smoothing"}
    )
    report_accuracy: bool = field(default=False, metadata={"help": "report token accuracy"})
    ignore_prefix_size: int = field(default=0, metadata={"help": "ignore the first N target positions"})
    ignore_eos: bool = field(default=False, metadata={"help": "ignore target positions holding eos"})
    sentence_avg: bool = II("optimization.sentence_avg")
    drop_worst_ratio: float = field(
        default=0.0, metadata={"help": "fraction of target tokens with the largest loss to discard"}
    )
    drop_worst_after: int = field(
        default=0, metadata={"help": "discard the worst tokens only after this many updates"}
    )
    use_rdrop: bool = field(default=False, metadata={"help": "use R-Drop (duplicate the batch, add a KL term)"})
    reg_alpha: float = field(default=1.0, metadata={"help": "weight of the R-Drop KL term"})
    sample_patch_num: int = field(
        default=196, metadata={"help": "image patches sampled for the first of two paired samples (pretraining)"}
    )
    constraint_range: Optional[str] = field(
        default=None,
        metadata={"help": "'start,end': only ids 0-3 and [start, end) may be predicted (others get -inf)"},
    )


def parse_constraint_range(text: Optional[str]) -> Optional[Tuple[int, int]]:
    """``"start,end"`` as two ints (None stays None); raises ValueError naming the option."""
    if text is None or text == "":
        return None
    parts = str(text).split(",")
    try:
        start, end = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"--constraint-range must be 'start,end' (two integers), got {text!r}") from None
    if not len(SPECIAL_IDS) <= start <= end:
        raise ValueError(f"--constraint-range {text!r}: need {len(SPECIAL_IDS)} <= start <= end")
    return start, end


@dataclass
class TokenSelection:
    """The scored target positions of a batch, in row-major (sample, position) order.

    ``mask`` (B x T) marks them; ``target``, ``constraint_masks`` (n x V) and ``conf`` (n) are
    their values. Selecting rows *before* the output projection is what keeps per-layer losses
    affordable.
    """

    mask: Tensor
    target: Tensor
    constraint_masks: Optional[Tensor] = None
    conf: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.target.numel()

    def rows_of_batch_major(self, states: Tensor) -> Tensor:
        """Rows (n x C) of a (B x T x C) tensor at the selected positions."""
        return states[self.mask]

    def rows_of_time_major(self, states: Tensor) -> Tensor:
        """Rows (n x C) of a (T x B x C) tensor (fairseq's layer states) at the selected positions."""
        return states.transpose(0, 1)[self.mask]


@dataclass
class LossTerms:
    """Summed losses of one prediction (one decoder layer) over the kept tokens."""

    loss: Tensor
    nll_loss: Tensor
    ntokens: int
    n_correct: Tensor
    total: int


def label_smoothed_nll_loss(
    lprobs: Tensor,
    target: Tensor,
    epsilon: float,
    constraint_masks: Optional[Tensor] = None,
    constraint_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Per-token (smoothed loss, nll) of log-probabilities ``lprobs`` (... x n x V) at ``target`` (n).

    The smoothing mass ``eps_i = eps / (K - 1)`` goes to each of the K allowed tokens, and the
    target gets ``1 - eps - eps_i`` (OFA's formula); K is the vocabulary size, the number of
    tokens a row's constraint mask allows (+1e-6), or the size of the constraint range (+1e-6).
    """
    index = target.unsqueeze(-1).expand(*lprobs.shape[:-1], 1)
    nll = -lprobs.gather(-1, index).squeeze(-1)
    if epsilon == 0:
        return nll, nll
    if constraint_masks is not None:
        smooth = -lprobs.masked_fill(~constraint_masks, 0.0).sum(-1)
        eps_i = epsilon / (constraint_masks.sum(-1).to(lprobs.dtype) - 1 + 1e-6)
    elif constraint_ids is not None:
        smooth = -lprobs.index_select(-1, constraint_ids).sum(-1)
        eps_i = epsilon / (constraint_ids.numel() - 1 + 1e-6)
    else:
        smooth = -lprobs.sum(-1)
        eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll + eps_i * smooth, nll


def worst_dropped_indices(loss: Tensor, ratio: float, paired: bool) -> Tensor:
    """Indices (... x k) of the tokens to keep: the ``int(n * (1 - ratio))`` smallest losses along the last dim.

    With ``paired`` (R-Drop) the two halves are copies of one batch: the choice is made on the first
    half and the same tokens are kept in both.
    """
    if not paired:
        keep = int(loss.size(-1) * (1 - ratio))
        return loss.topk(keep, dim=-1, largest=False).indices
    half = loss.size(-1) // 2
    keep = int(half * (1 - ratio))
    first = loss[..., :half].topk(keep, dim=-1, largest=False).indices
    return torch.cat([first, first + half], dim=-1)


def symmetric_kl(lprobs: Tensor, constraint_ids: Optional[Tensor] = None) -> Tensor:
    """R-Drop's (KL(p||q) + KL(q||p)) / 2 summed, with p, q the two halves of ``lprobs`` along dim -2.

    Equals ``sum((exp p - exp q) * (p - q)) / 2``; entries that are -inf in both copies count 0.
    """
    if constraint_ids is not None:
        lprobs = lprobs.index_select(-1, constraint_ids)
    half = lprobs.size(-2) // 2
    p, q = lprobs[..., :half, :], lprobs[..., half : 2 * half, :]
    both_finite = torch.isfinite(p) & torch.isfinite(q)
    p, q = p.masked_fill(~both_finite, 0.0), q.masked_fill(~both_finite, 0.0)
    return ((p.exp() - q.exp()) * (p - q)).masked_fill(~both_finite, 0.0).sum() / 2


def rdrop_sample(sample: Any, key: str = "sample") -> Any:
    """A copy of ``sample`` with every batch entry duplicated (tensors/arrays/lists twice, counts doubled)."""
    if isinstance(sample, dict):
        return {name: rdrop_sample(value, f"{key}[{name!r}]") for name, value in sample.items()}
    if torch.is_tensor(sample):
        return sample.repeat(2, *([1] * (sample.dim() - 1))) if sample.dim() > 0 else sample.repeat(2)
    if isinstance(sample, np.ndarray):
        return np.concatenate([sample, sample])
    if isinstance(sample, list):
        return sample + sample
    if isinstance(sample, bool) or sample is None:
        return sample
    if isinstance(sample, int):
        return sample * 2
    raise TypeError(f"--use-rdrop cannot duplicate {key} of type {type(sample).__name__}")


@register_criterion("adjust_label_smoothed_cross_entropy", dataclass=AdjustLabelSmoothedCrossEntropyConfig)
class AdjustLabelSmoothedCrossEntropyCriterion(FairseqCriterion):
    """Label-smoothed cross-entropy with OFA's constraints, drop-worst and R-Drop options."""

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
    ):
        super().__init__(task)
        if not 0 <= drop_worst_ratio < 1:
            raise ValueError(f"--drop-worst-ratio must be in [0, 1), got {drop_worst_ratio}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {label_smoothing}")
        # the loss: smoothing, which target positions count, and the vocabulary slice scored
        self.eps = label_smoothing
        self.constraint_range = parse_constraint_range(constraint_range)
        self.ignore_prefix_size, self.ignore_eos = ignore_prefix_size, ignore_eos
        self.eos_idx = task.target_dictionary.eos()
        # what is dropped or added: the worst tokens, R-Drop's pair, image patches
        self.drop_worst_ratio, self.drop_worst_after = drop_worst_ratio, drop_worst_after
        self.use_rdrop, self.reg_alpha = use_rdrop, reg_alpha
        self.sample_patch_num = sample_patch_num
        # reporting
        self.sentence_avg, self.report_accuracy = sentence_avg, report_accuracy

    # ------------------------------------------------------------------ forward
    def forward(self, model, sample, update_num: int = 0, reduce: bool = True):
        """(loss, sample_size, logging_output) of a batch, or of a pair of batches given as a list."""
        if isinstance(sample, list):
            return self._forward_pair(model, sample, update_num, reduce)
        if self.use_rdrop:
            sample = rdrop_sample(sample)
        net_output = model(**sample["net_input"])
        selection = self.select_tokens(sample)
        logits = selection.rows_of_batch_major(net_output[0]).unsqueeze(0)
        terms = self.token_losses(model, logits, selection, update_num)[0]
        return terms.loss, self.sample_size(sample, terms.ntokens), self.logging_output(sample, terms)

    def _forward_pair(self, model, samples: List[Dict[str, Any]], update_num: int, reduce: bool):
        if len(samples) != 2:
            raise ValueError(f"a list sample must hold two batches (OFA pretraining), got {len(samples)}")
        if self.sample_patch_num > 0:
            samples[0]["net_input"]["sample_patch_num"] = self.sample_patch_num
        loss_v1, size_v1, log_v1 = self.forward(model, samples[0], update_num, reduce)
        loss_v2, size_v2, log_v2 = self.forward(model, samples[1], update_num, reduce)
        loss = loss_v1 / size_v1 + loss_v2 / size_v2
        logging_output = {
            "loss": loss.data,
            "loss_v1": loss_v1.data,
            "loss_v2": loss_v2.data,
            "nll_loss": log_v1["nll_loss"] / size_v1 + log_v2["nll_loss"] / size_v2,
            "ntokens": log_v1["ntokens"] + log_v2["ntokens"],
            "nsentences": log_v1["nsentences"] + log_v2["nsentences"],
            "sample_size": 1,
            "sample_size_v1": size_v1,
            "sample_size_v2": size_v2,
        }
        for key in ("n_correct", "total"):
            if key in log_v1:
                logging_output[key] = log_v1[key] + log_v2[key]
        return loss, 1, logging_output

    def sample_size(self, sample: Dict[str, Any], ntokens: int) -> int:
        return sample["target"].size(0) if self.sentence_avg else ntokens

    def logging_output(self, sample: Dict[str, Any], terms: LossTerms) -> Dict[str, Any]:
        output = {
            "loss": terms.loss.data,
            "nll_loss": terms.nll_loss.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "sample_size": self.sample_size(sample, terms.ntokens),
        }
        if self.report_accuracy:
            output["n_correct"] = utils.item(terms.n_correct)
            output["total"] = terms.total
        return output

    # ------------------------------------------------------------------ tokens
    def select_tokens(self, sample: Dict[str, Any]) -> TokenSelection:
        """The target positions that count: not padding, not in the ignored prefix, not eos if ignored."""
        target = sample["target"]
        mask = target.ne(self.padding_idx)
        if self.ignore_prefix_size > 0:
            mask[:, : self.ignore_prefix_size] = False
        if self.ignore_eos:
            mask &= target.ne(self.eos_idx)
        constraint_masks = sample.get("constraint_masks")
        if constraint_masks is not None:
            if constraint_masks.shape[:2] != target.shape:
                raise ValueError(
                    f"sample['constraint_masks'] has shape {tuple(constraint_masks.shape)}, "
                    f"but sample['target'] has shape {tuple(target.shape)}"
                )
            constraint_masks = constraint_masks[mask]
        conf = sample.get("conf")
        if conf is not None:
            conf = conf.view(-1, 1).expand_as(target)[mask]
        return TokenSelection(mask=mask, target=target[mask], constraint_masks=constraint_masks, conf=conf)

    def constrain_logits(self, logits: Tensor, selection: TokenSelection) -> Tensor:
        """``logits`` (... x n x V) with disallowed tokens set to -inf (constraint masks and range)."""
        if selection.constraint_masks is not None:
            logits = logits.masked_fill(~selection.constraint_masks, -math.inf)
        if self.constraint_range is not None:
            start, end = self.constraint_range
            blocked = torch.zeros(logits.size(-1), dtype=torch.bool, device=logits.device)
            blocked[len(SPECIAL_IDS) : start] = True
            blocked[end:] = True
            logits = logits.masked_fill(blocked, -math.inf)
        return logits

    def constraint_ids(self, device) -> Optional[Tensor]:
        if self.constraint_range is None:
            return None
        start, end = self.constraint_range
        return torch.tensor(list(SPECIAL_IDS) + list(range(start, end)), dtype=torch.long, device=device)

    def token_losses(
        self, model, logits: Tensor, selection: TokenSelection, update_num: int
    ) -> List[LossTerms]:
        """Summed loss terms of each prediction in ``logits`` (L x n x V), one per leading index.

        Drop-worst selection is made for every prediction independently.
        """
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
        if self.drop_worst_ratio > 0 and update_num > self.drop_worst_after:
            kept = worst_dropped_indices(loss, self.drop_worst_ratio, paired=self.use_rdrop)
            loss, nll = loss.gather(-1, kept), nll.gather(-1, kept)
            if self.use_rdrop:
                lprobs = lprobs.gather(-2, kept.unsqueeze(-1).expand(*kept.shape, lprobs.size(-1)))
        ntokens = loss.size(-1)
        terms = []
        for layer in range(loss.size(0)):
            total = loss[layer].sum()
            if self.use_rdrop:
                total = total + self.reg_alpha * symmetric_kl(lprobs[layer], constraint_ids)
            terms.append(LossTerms(total, nll[layer].sum(), ntokens, n_correct[layer], selection.num_tokens))
        return terms

    # ------------------------------------------------------------------ metrics
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """Aggregate logging outputs (of all workers); losses are per token (or sentence) in nats."""
        keys = ("loss", "nll_loss", "ntokens", "nsentences", "sample_size")
        total = {key: summed_log(logging_outputs, key) for key in keys}
        sample_size = total["sample_size"]
        metrics.log_scalar("loss", total["loss"] / sample_size, sample_size, round=3)
        metrics.log_scalar("nll_loss", total["nll_loss"] / sample_size, total["ntokens"], round=3)
        metrics.log_derived("ppl", lambda meters: utils.get_perplexity(meters["nll_loss"].avg, base=math.e))
        for key in ("ntokens", "nsentences", "sample_size"):
            metrics.log_scalar(key, total[key], 1, round=3)
        for suffix in ("v1", "v2"):
            size = summed_log(logging_outputs, f"sample_size_{suffix}")
            if size > 0:
                loss = summed_log(logging_outputs, f"loss_{suffix}") / size
                metrics.log_scalar(f"loss_{suffix}", loss, size, round=3)
                metrics.log_scalar(f"sample_size_{suffix}", size, 1, round=3)
        log_accuracy(logging_outputs, "n_correct", "total", "accuracy")

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True


def summed_log(logging_outputs, key: str):
    """Sum of ``key`` over logging outputs (0 where absent), as a Python number."""
    value = sum(log.get(key, 0) for log in logging_outputs)
    return utils.item(value) if torch.is_tensor(value) else value


def log_accuracy(logging_outputs, correct_key: str, total_key: str, name: str) -> None:
    """Log ``name`` = 100 * correct / total as a derived metric when any tokens were counted."""
    total = summed_log(logging_outputs, total_key)
    if total <= 0:
        return
    metrics.log_scalar(total_key, total)
    metrics.log_scalar(correct_key, summed_log(logging_outputs, correct_key))
    metrics.log_derived(
        name,
        lambda meters: round(meters[correct_key].sum * 100.0 / meters[total_key].sum, 3)
        if meters[total_key].sum > 0
        else float("nan"),
    )
