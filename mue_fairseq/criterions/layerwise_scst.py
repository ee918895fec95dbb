"""`mue_layerwise_scst`: OFA's self-critical loss at every decoder exit, through the shared head.

The captions are sampled and rewarded exactly as `scst_reward_criterion` does (the task's ``--scst``
generator on the full-depth model, CIDEr-D against the image's references, leave-one-out
baseline), or, with ``--sample-with-exits``, by the exiting model (the model's own ``--mue-*``
exit options, as it will decode at inference; the reward then judges the captions the exits give);
then, as MuE's layer-wise loss does for cross-entropy, every decoder layer i predicts
the sampled captions through the final LayerNorm and the tied output projection,
``decoder.output_layer(decoder.layer_norm(h_i))``, and the loss is ``sum_i w_i * SCST_i``, each
``SCST_i = -sum_t log p_i(y_t) * reward`` over the captions' tokens. The weights are those of
`mue_layerwise_ce`: ``--layer-reduction mean`` (1/N each, default), ``sum`` (1 each), or
``--layer-weights`` (``0,..,0,1`` gives `scst_reward_criterion`'s loss).

Only the non-padding positions of the sampled captions are projected onto the vocabulary.
Logged as `scst_reward_criterion` (``loss`` is the weighted sum), plus ``loss_layer{i}``, each
layer's own SCST loss per token (or caption).
"""
import contextlib
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from fairseq.criterions import register_criterion
from fairseq.logging import metrics
from torch import Tensor

from mue_fairseq.criterions.label_smoothed_ce import summed_log
from mue_fairseq.criterions.layerwise_ce import LAYER_REDUCTIONS, decoder_layer_weights, parse_layer_weights
from mue_fairseq.criterions.scst import ScstRewardCriterion, ScstRewardCriterionConfig
from mue_fairseq.tasks.exit_validation import full_depth, has_exits

_LAYER_KEY = re.compile(r"^loss_layer(\d+)$")


@dataclass
class LayerwiseScstConfig(ScstRewardCriterionConfig):
    layer_reduction: LAYER_REDUCTIONS = field(
        default="mean",
        metadata={"help": "combine the N per-layer SCST losses by their mean or their sum; ignored when "
                          "--layer-weights is given"},
    )
    layer_weights: Optional[str] = field(
        default=None,
        metadata={"help": "comma-separated weight of each decoder layer's SCST loss, first layer first "
                          "(0,..,0,1 is OFA's scst_reward_criterion)"},
    )
    sample_with_exits: bool = field(
        default=False,
        metadata={"help": "sample the captions with the model's MuE exits (its --mue-*-threshold options) "
                          "instead of at full depth"},
    )


@register_criterion("mue_layerwise_scst", dataclass=LayerwiseScstConfig)
class LayerwiseScstCriterion(ScstRewardCriterion):
    """Self-critical sequence training of every decoder exit, with samples from the full-depth or the
    exiting model."""

    def __init__(
        self,
        task,
        scst_cider_cached_tokens: str,
        sentence_avg: bool,
        ignore_prefix_size: int = 0,
        constraint_range: Optional[str] = None,
        layer_reduction: str = "mean",
        layer_weights: Optional[str] = None,
        sample_with_exits: bool = False,
    ):
        super().__init__(task, scst_cider_cached_tokens, sentence_avg, ignore_prefix_size, constraint_range)
        if str(layer_reduction) not in ("mean", "sum"):
            raise ValueError(f"--layer-reduction must be mean or sum, got {layer_reduction!r}")
        self.layer_reduction = str(layer_reduction)
        self.explicit_layer_weights = parse_layer_weights(layer_weights)
        self.sample_with_exits = sample_with_exits

    def sampling_depth(self, model):
        if not self.sample_with_exits:
            return super().sampling_depth(model)
        if not has_exits(model):
            raise ValueError("--sample-with-exits samples with the model's MuE exits, but none is enabled: use an "
                             "mue_ofa --arch and set --mue-decoder-threshold (or another --mue-* exit option)")
        return contextlib.nullcontext()

    def forward(self, model, sample, update_num: int = 0, reduce: bool = True):
        if not reduce:
            raise NotImplementedError("mue_layerwise_scst returns the summed loss only")
        tokens, scores, rewards = self.sampled_rewards(model, sample)
        net_input, target = self.sampled_batch(sample, tokens)
        with full_depth(model):
            _, extra = model(**net_input, features_only=True)
        inner_states = extra["inner_states"]
        num_layers = len(model.decoder.layers)
        if len(inner_states) != num_layers + 1:
            raise RuntimeError(f"mue_layerwise_scst needs the output of every decoder layer, but the model "
                               f"returned {len(inner_states) - 1} layer states for {num_layers} layers")

        mask = target.ne(self.padding_idx)
        mask[:, : self.ignore_prefix_size] = False
        reward = torch.as_tensor(rewards, dtype=torch.float64, device=target.device)
        token_reward = reward.unsqueeze(-1).expand_as(target)[mask]
        token_target = target[mask]
        weights = decoder_layer_weights(self.explicit_layer_weights, self.layer_reduction, num_layers)
        plan = [(layer, weight) for layer, weight in enumerate(weights, start=1) if weight != 0]
        layer_losses = self.layer_losses(model, inner_states, mask, token_target, token_reward, [i for i, _ in plan])
        loss = sum(weight * layer_losses[layer] for layer, weight in plan)

        loss, sample_size, logging_output = self.batch_result(loss, scores, int(mask.sum()), target.size(0))
        zero = loss.new_zeros(())
        for layer in range(1, num_layers + 1):
            logging_output[f"loss_layer{layer}"] = layer_losses[layer].data if layer in layer_losses else zero
        return loss, sample_size, logging_output

    def layer_losses(self, model, inner_states: List[Tensor], mask: Tensor, target: Tensor, reward: Tensor,
                     layers: List[int]):
        """{layer: -sum log p_layer(target) * reward} over the selected positions (float64)."""
        decoder = model.decoder
        hidden = torch.stack([inner_states[layer].transpose(0, 1)[mask] for layer in layers])
        if decoder.layer_norm is not None:
            hidden = decoder.layer_norm(hidden)
        lprobs = self.log_probs(model, decoder.output_layer(hidden))
        nll = -lprobs.gather(-1, target.view(1, -1, 1).expand(len(layers), -1, 1)).squeeze(-1)
        losses = (nll * reward).sum(-1)
        return dict(zip(layers, losses))

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = summed_log(logging_outputs, "sample_size")
        layers = sorted({int(m.group(1)) for log in logging_outputs for m in map(_LAYER_KEY.match, log) if m})
        for layer in layers:
            value = summed_log(logging_outputs, f"loss_layer{layer}") / sample_size
            metrics.log_scalar(f"loss_layer{layer}", value, sample_size, round=3)
