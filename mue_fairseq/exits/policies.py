"""Exit decisions for encoder streams and decoder tokens.

MuE decides from the similarity of consecutive layer states; the baselines of the paper's
comparison decide from fixed depths (static), or from each layer's own prediction through the
shared output head: entropy (DeeBERT), softmax confidence (CALM) and patience (PABEE). The
replay policy looks the decisions up in recorded exit statistics (`replay.ExitReplay`).
"""
from typing import Callable, Optional

import torch
from torch import Tensor

from .config import MuEConfig
from .replay import ExitReplay
from .schedule import decoder_threshold
from .similarity import batch_cosine, stream_cosine


class StreamExitDecider:
    """Decides, after each encoder layer, which samples of one stream (image or text) stop."""

    def __init__(self, cfg: MuEConfig, threshold: float, static_layers: int, num_layers: int,
                 replay_layers: Optional[Tensor] = None):
        self.num_layers = num_layers
        self.batch_joint = cfg.mue_batch_joint_exit
        self.passes = cfg.similarity_passes
        self.replay_layers = replay_layers  # replay: layers to run per sample of the batch (B,)
        if cfg.policy == "similarity":
            self.threshold = threshold if threshold < 1 else None
            self.static_layers = 0
        else:
            self.threshold = None
            self.static_layers = static_layers if 0 < static_layers < num_layers else 0

    @property
    def enabled(self) -> bool:
        return self.threshold is not None or self.static_layers > 0 or self.replay_layers is not None

    def __call__(self, layer_idx: int, new: Tensor, old: Tensor, padding: Optional[Tensor],
                 rows: Optional[Tensor] = None) -> Tensor:
        """Bool over the samples of `new` (T x A x C): stop after layer `layer_idx` (0-based).
        `rows` (A,): which of the batch's samples they are (the replay needs it)."""
        batch = new.size(1)
        if self.replay_layers is not None:
            return self.replay_layers[rows] <= layer_idx + 1
        if self.static_layers:
            return torch.full((batch,), layer_idx + 1 >= self.static_layers, dtype=torch.bool, device=new.device)
        if self.batch_joint:
            return self.passes(batch_cosine(new, old), self.threshold).expand(batch)
        return self.passes(stream_cosine(new, old, padding), self.threshold)


class TokenExitDecider:
    """Decides, after each decoder layer, which rows (hypotheses) stop at the current step.

    `predict(h)` maps states (A x C) to logits (A x V) through the shared final norm and output
    projection; only the prediction-based policies call it (it is what makes them costly).
    `allowed` (rows x V, bool): the tokens the generator may emit for each row at this step (an
    answer trie, a location-token range); the prediction-based policies then judge the same
    renormalised distribution the generator decodes from, not the whole vocabulary's.
    """

    def __init__(self, cfg: MuEConfig, num_layers: int, predict: Callable[[Tensor], Tensor],
                 replay: Optional[ExitReplay] = None, allowed: Optional[Tensor] = None):
        self.cfg = cfg
        self.num_layers = num_layers
        self.predict = predict
        self.replay = replay
        self.allowed = allowed
        self._replay_layers: Optional[Tensor] = None
        self.passes = cfg.similarity_passes  # >= or >, fixed for the model's options
        self.threshold: Optional[float] = None
        self._previous_argmax: Optional[Tensor] = None
        self._agreements: Optional[Tensor] = None

    def begin_step(self, num_rows: int, step: int, num_steps: int, device) -> bool:
        """Prepare the decisions of decoding step `step`; False when no row may exit at this step."""
        cfg = self.cfg
        if cfg.policy == "replay":  # the recorded layers already hold any full-depth steps
            self._replay_layers = self.replay.decoder_layers_at(step, num_rows, device)
            return True
        if not cfg.decoder_exits_enabled() or step < cfg.full_depth_steps(num_steps):
            return False
        if cfg.policy == "similarity":
            self.threshold = decoder_threshold(
                cfg.mue_decoder_threshold, cfg.mue_decoder_beta, cfg.mue_decoder_tau, step, num_steps
            )
        self.start_rows(num_rows, device)
        return True

    def start_rows(self, num_rows: int, device) -> None:
        """Fresh per-row state (patience counts) for `num_rows` rows."""
        if self.cfg.policy == "patience":
            self._previous_argmax = torch.full((num_rows,), -1, dtype=torch.long, device=device)
            self._agreements = torch.zeros(num_rows, dtype=torch.long, device=device)

    def __call__(self, layer_idx: int, new: Tensor, old: Tensor, rows: Tensor) -> Tensor:
        """Bool (A,) for the rows `rows` whose states after layer `layer_idx` are `new` (A x C)."""
        policy = self.cfg.policy
        if policy == "replay":
            return self._replay_layers[rows] <= layer_idx + 1
        if policy == "static":
            return torch.full((new.size(0),), layer_idx + 1 >= self.cfg.mue_static_decoder_layers,
                              dtype=torch.bool, device=new.device)
        if policy == "similarity":
            if self.cfg.mue_batch_joint_exit:
                return self.passes(batch_cosine(new, old), self.threshold).expand(new.size(0))
            return self.passes(stream_cosine(new.unsqueeze(0), old.unsqueeze(0)), self.threshold)
        logits = self.predict(new).float()
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed[rows], float("-inf"))
        if policy == "entropy":
            log_probs = torch.log_softmax(logits, dim=-1)
            probs = log_probs.exp()
            # masked tokens (p = 0, log p = -inf) add 0, not nan
            entropy = -torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs)).sum(-1)
            return entropy <= self.cfg.mue_entropy_threshold
        if policy == "confidence":
            return torch.softmax(logits, dim=-1).max(dim=-1).values >= self.cfg.mue_confidence_threshold
        # patience: consecutive layers whose argmax agrees
        argmax = logits.argmax(dim=-1)
        agree = argmax.eq(self._previous_argmax[rows])
        self._agreements[rows] = torch.where(agree, self._agreements[rows] + 1, torch.zeros_like(argmax))
        self._previous_argmax[rows] = argmax
        return self._agreements[rows] >= self.cfg.mue_patience

