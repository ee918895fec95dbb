"""MuE's layer-wise task loss: OFA's label-smoothed cross-entropy on every decoder layer.

Layer i's prediction is ``decoder.output_layer(decoder.layer_norm(h_i))``, with ``h_i`` the
output of decoder layer i (``extra["inner_states"][i]``) and the final LayerNorm and tied output
projection shared by all exits, so layer N is the model's normal output. The total loss is
``sum_i w_i * CE_i``, each ``CE_i`` being OFA's summed loss (constraints, smoothing and drop-worst,
the worst tokens chosen per layer independently, as the authors' code does):

* ``--layer-reduction mean`` (default, the paper): ``w_i = 1/N``;
* ``--layer-reduction sum`` (the authors' released ``MuE_Task_Loss``): ``w_i = 1``;
* ``--layer-weights 0,0,1``: explicit weights (one per decoder layer), replacing the above.

Cost: the output projection over the 59,457-word vocabulary dominates. Only the scored target
positions are projected (rows are selected before the projection), and layers of weight 0 are
skipped. ``--sampled-intermediate-layers K`` trades variance for time: each training step scores
the last layer and K of the other weighted layers drawn uniformly without replacement, each
reweighted by (number of candidates) / K, an unbiased estimate of the full loss and its gradient.
Validation always scores every weighted layer. Measurements: BENCHMARKS.md (about 2x the step
time of OFA's criterion when decoder and vocabulary dominate, 1.2x with K=1; 1.00-1.02x measured
with OFA-Base's whole model at 480 px, where the encoder dominates).

Logged: ``loss`` and ``nll_loss`` are the weighted sums (per token), so ``--layer-weights 0,..,0,1``
logs exactly what OFA's criterion logs; ``loss_layer{i}``, ``nll_loss_layer{i}`` and
``accuracy_layer{i}`` are each layer's own; ``accuracy`` (``--report-accuracy``) is the deepest
scored layer's.
"""
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics
from torch import Tensor

from .label_smoothed_ce import (
    AdjustLabelSmoothedCrossEntropyConfig,
    AdjustLabelSmoothedCrossEntropyCriterion,
    LossTerms,
    TokenSelection,
    summed_log,
    rdrop_sample,
)

LAYER_REDUCTIONS = ChoiceEnum(["mean", "sum"])
_LAYER_KEY = re.compile(r"^sample_size_layer(\d+)$")


@dataclass
class LayerwiseCrossEntropyConfig(AdjustLabelSmoothedCrossEntropyConfig):
    layer_reduction: LAYER_REDUCTIONS = field(
        default="mean",
        metadata={
            "help": "combine the N per-layer losses by their mean (the paper) or their sum "
            "(the authors' released code); ignored when --layer-weights is given"
        },
    )
    layer_weights: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated weight of each decoder layer's loss, first layer first "
            "(e.g. 0,0,1 trains the last layer only); replaces --layer-reduction"
        },
    )
    sampled_intermediate_layers: int = field(
        default=0,
        metadata={
            "help": "0: score every weighted layer. K > 0: in training, score the last layer and K "
            "randomly drawn other weighted layers per step, reweighted to keep the loss unbiased "
            "(cheaper, noisier)"
        },
    )


def parse_layer_weights(text: Optional[str]) -> Optional[List[float]]:
    """``"0,0.5,1"`` as floats (None stays None); raises ValueError naming the option."""
    if text is None or str(text).strip() == "":
        return None
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--layer-weights must be comma-separated numbers, got {text!r}") from None
    if any(weight < 0 for weight in weights) or not any(weight > 0 for weight in weights):
        raise ValueError(f"--layer-weights {text!r}: weights must be >= 0 and not all 0")
    return weights


def decoder_layer_weights(explicit: Optional[List[float]], reduction: str, num_layers: int) -> List[float]:
    """Weight of each decoder layer's loss, layer 1 first: ``explicit`` (--layer-weights) if given,
    else 1/N each (``mean``) or 1 each (``sum``)."""
    if explicit is not None:
        if len(explicit) != num_layers:
            raise ValueError(
                f"--layer-weights has {len(explicit)} values but the decoder has {num_layers} layers"
            )
        return list(explicit)
    return [1.0 / num_layers if reduction == "mean" else 1.0] * num_layers


@register_criterion("mue_layerwise_ce", dataclass=LayerwiseCrossEntropyConfig)
class LayerwiseCrossEntropyCriterion(AdjustLabelSmoothedCrossEntropyCriterion):
    """OFA's label-smoothed cross-entropy summed over decoder layers with per-layer weights."""

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
        layer_reduction: str = "mean",
        layer_weights: Optional[str] = None,
        sampled_intermediate_layers: int = 0,
    ):
        super().__init__(
            task,
            sentence_avg,
            label_smoothing,
            ignore_prefix_size=ignore_prefix_size,
            ignore_eos=ignore_eos,
            report_accuracy=report_accuracy,
            drop_worst_ratio=drop_worst_ratio,
            drop_worst_after=drop_worst_after,
            use_rdrop=use_rdrop,
            reg_alpha=reg_alpha,
            sample_patch_num=sample_patch_num,
            constraint_range=constraint_range,
        )
        if str(layer_reduction) not in ("mean", "sum"):
            raise ValueError(f"--layer-reduction must be mean or sum, got {layer_reduction!r}")
        if sampled_intermediate_layers < 0:
            raise ValueError(f"--sampled-intermediate-layers must be >= 0, got {sampled_intermediate_layers}")
        self.layer_reduction = str(layer_reduction)
        self.explicit_layer_weights = parse_layer_weights(layer_weights)
        self.sampled_intermediate_layers = sampled_intermediate_layers

    # ------------------------------------------------------------------ layers
    def layer_weights(self, num_layers: int) -> List[float]:
        """Weight of each decoder layer's loss, layer 1 first."""
        return decoder_layer_weights(self.explicit_layer_weights, self.layer_reduction, num_layers)

    def scored_layers(self, num_layers: int, training: bool) -> List[Tuple[int, float]]:
        """(layer, weight) pairs to score in this step, layers numbered 1..N, weight 0 omitted."""
        weights = self.layer_weights(num_layers)
        plan = {layer: w for layer, w in enumerate(weights, start=1) if w != 0}
        candidates = [layer for layer in plan if layer != num_layers]
        sample = self.sampled_intermediate_layers
        if training and 0 < sample < len(candidates):
            # fairseq seeds the global RNG with (seed + update number) before every step.
            drawn = {candidates[j] for j in torch.randperm(len(candidates))[:sample].tolist()}
            scale = len(candidates) / sample
            plan = {
                layer: w * scale if layer in drawn else w
                for layer, w in plan.items()
                if layer in drawn or layer not in candidates
            }
        return sorted(plan.items())

    def layer_logits(self, model, inner_states: List[Tensor], selection: TokenSelection, layers: List[int]) -> Tensor:
        """Logits (L x n x V) of the given layers at the selected positions."""
        decoder = model.decoder
        hidden = torch.stack([selection.rows_of_time_major(inner_states[layer]) for layer in layers])
        if decoder.layer_norm is not None:
            hidden = decoder.layer_norm(hidden)
        return decoder.output_layer(hidden)

    # ------------------------------------------------------------------ forward
    def forward(self, model, sample, update_num: int = 0, reduce: bool = True):
        if isinstance(sample, list):
            raise NotImplementedError("mue_layerwise_ce does not take paired samples (OFA pretraining)")
        if self.use_rdrop:
            sample = rdrop_sample(sample)
        _, extra = model(**sample["net_input"], features_only=True)
        inner_states = extra["inner_states"]
        num_layers = len(inner_states) - 1
        if num_layers != len(model.decoder.layers):
            raise RuntimeError(
                f"mue_layerwise_ce needs the output of every decoder layer, but the model returned "
                f"{num_layers} layer states for {len(model.decoder.layers)} layers (are decoder exits "
                "active in evaluation? validate with exits disabled)"
            )
        plan = self.scored_layers(num_layers, model.training)
        selection = self.select_tokens(sample)
        layers = [layer for layer, _ in plan]
        logits = self.layer_logits(model, inner_states, selection, layers)
        terms = dict(zip(layers, self.token_losses(model, logits, selection, update_num)))

        loss = sum(weight * terms[layer].loss for layer, weight in plan)
        nll_loss = sum(weight * terms[layer].nll_loss for layer, weight in plan)
        deepest = terms[layers[-1]]
        combined = LossTerms(loss, nll_loss, deepest.ntokens, deepest.n_correct, deepest.total)
        logging_output = self.logging_output(sample, combined)
        logging_output.update(self.layer_logging(terms, num_layers, sample))
        return loss, self.sample_size(sample, deepest.ntokens), logging_output

    def layer_logging(self, terms: Dict[int, LossTerms], num_layers: int, sample: Dict[str, Any]) -> Dict[str, Any]:
        """Per-layer sums; every layer has its keys, of one type (zeros when not scored).

        fairseq sums logging outputs over ranks key by key, so all ranks must log the same keys.
        """
        any_term = next(iter(terms.values()))
        zero_loss, zero_count = any_term.loss.new_zeros(()), any_term.n_correct.new_zeros(())
        output = {}
        for layer in range(1, num_layers + 1):
            term = terms.get(layer)
            output[f"loss_layer{layer}"] = term.loss.data if term else zero_loss
            output[f"nll_loss_layer{layer}"] = term.nll_loss.data if term else zero_loss
            output[f"n_correct_layer{layer}"] = term.n_correct if term else zero_count
            output[f"total_layer{layer}"] = term.total if term else 0
            output[f"sample_size_layer{layer}"] = self.sample_size(sample, term.ntokens) if term else 0
        return output

    # ------------------------------------------------------------------ metrics
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        """The combined metrics, then ``loss_layer{i}``, ``nll_loss_layer{i}``, ``accuracy_layer{i}``."""
        super().reduce_metrics(logging_outputs)
        layers = sorted({int(m.group(1)) for log in logging_outputs for m in map(_LAYER_KEY.match, log) if m})
        for layer in layers:
            size = summed_log(logging_outputs, f"sample_size_layer{layer}")
            if size <= 0:
                continue
            for name in ("loss", "nll_loss"):
                value = summed_log(logging_outputs, f"{name}_layer{layer}") / size
                metrics.log_scalar(f"{name}_layer{layer}", value, size, round=3)
            total = summed_log(logging_outputs, f"total_layer{layer}")
            if total > 0:
                correct = summed_log(logging_outputs, f"n_correct_layer{layer}")
                metrics.log_scalar(f"accuracy_layer{layer}", 100.0 * correct / total, total, round=3)
