"""No-repeat n-gram blocking with the semantics of OFA's generator, vectorised in torch.

A hypothesis may not produce an n-gram it already holds: at step `step` (bos at position 0, the
tokens generated so far at 1..step), every token that once followed the hypothesis's last n-1
tokens gets log-probability -inf. Earlier n-grams include those starting at bos.

fairseq-fixed 0.12.3's CPU fallback compares the last n-1 entries of the whole token buffer,
which are padding while generating, so it never bans anything; OFA's fork (and fairseq's CUDA
kernel) compare the last n-1 *generated* tokens. This module does the latter on any device,
with no Python loop over hypotheses.
"""
import math

import torch
from torch import Tensor, nn


def ban_repeated_ngrams(tokens: Tensor, lprobs: Tensor, step: int, ngram_size: int) -> Tensor:
    """Set to -inf (in place) each row's tokens that would repeat one of its n-grams.

    Args:
        tokens: (rows, >= step + 1) token buffer; columns 0..step hold bos and the history.
        lprobs: (rows, vocab) next-token log-probabilities, changed in place and returned.
        step: index of the last filled column of `tokens`.
        ngram_size: n; 0 disables blocking.
    """
    if ngram_size <= 0:
        return lprobs
    history = tokens[:, : step + 1]
    # Earlier n-grams whose first n-1 tokens can equal the current last n-1: they start at
    # positions 0 .. step + 1 - n, so there are `candidates` of them.
    candidates = step + 2 - ngram_size
    if candidates <= 0:
        return lprobs
    followers = history[:, ngram_size - 1 :]  # the n-th token of each earlier n-gram
    if ngram_size == 1:
        matches = torch.ones_like(followers, dtype=torch.bool)  # unigrams: every earlier token
    else:
        context = history[:, candidates:]  # the last n-1 tokens, (rows, n-1)
        prefixes = history.unfold(1, ngram_size - 1, 1)[:, :candidates]  # (rows, candidates, n-1)
        matches = prefixes.eq(context.unsqueeze(1)).all(dim=2)
    rows, positions = matches.nonzero(as_tuple=True)
    lprobs[rows, followers[rows, positions]] = -math.inf
    return lprobs


class RepeatedNGramBlocker(nn.Module):
    """Drop-in for fairseq's `NGramRepeatBlock` (same call signature) with OFA's semantics."""

    def __init__(self, ngram_size: int):
        super().__init__()
        if ngram_size < 0:
            raise ValueError(f"--no-repeat-ngram-size must be >= 0, got {ngram_size}")
        self.ngram_size = ngram_size

    def forward(self, tokens: Tensor, lprobs: Tensor, bsz: int, beam_size: int, step: int) -> Tensor:
        if tokens.size(0) != lprobs.size(0):
            raise ValueError(f"{tokens.size(0)} token rows but {lprobs.size(0)} rows of log-probabilities")
        return ban_repeated_ngrams(tokens, lprobs, step, self.ngram_size)
