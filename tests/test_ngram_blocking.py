"""No-repeat n-gram blocking: OFA's rule, checked by hand and against a plain per-row statement of it."""
import math
import random

import pytest
import torch

from mue_fairseq.generation.ngram_blocking import RepeatedNGramBlocker, ban_repeated_ngrams

PAD, BOS = 1, 0


def banned_by_rule(history, n):
    """The rule in words: tokens that followed an earlier occurrence of the last n-1 tokens."""
    if len(history) + 1 < n:
        return set()
    context = history[len(history) - n + 1:] if n > 1 else []
    return {history[i + n - 1] for i in range(len(history) - n + 1) if history[i:i + n - 1] == context}


def banned_after(tokens, step, n, vocab=20):
    lprobs = torch.zeros(tokens.size(0), vocab)
    ban_repeated_ngrams(tokens, lprobs, step, n)
    return [set(torch.nonzero(row == -math.inf).flatten().tolist()) for row in lprobs]


def test_hand_computed_ban_list_with_bos_and_padding():
    # Buffer of two rows: bos, the generated tokens up to step 5, then padding (as while generating).
    tokens = torch.tensor([
        [BOS, 5, 6, 7, 5, 6, PAD, PAD, PAD],   # last two "5 6" followed by 7 before: ban 7
        [BOS, 5, BOS, 5, 9, 9, PAD, PAD, PAD],  # last two "9 9" never seen before: nothing
    ])
    assert banned_after(tokens, step=5, n=3) == [{7}, set()]
    # bigrams: "6" was followed by 7; row 2: "9" was followed by 9
    assert banned_after(tokens, step=5, n=2) == [{7}, {9}]
    assert banned_after(tokens, step=1, n=3) == [set(), set()]
    # n-grams starting at bos count: in row 2, "bos 5" was followed by bos
    assert banned_after(tokens, step=3, n=3) == [set(), {BOS}]
    # unigrams: everything generated so far, bos included; padding beyond `step` never counts
    assert banned_after(tokens, step=2, n=1) == [{BOS, 5, 6}, {BOS, 5}]


def test_too_short_history_and_disabled_ban_nothing():
    tokens = torch.tensor([[BOS, 4, 4, PAD]])
    assert banned_after(tokens, step=1, n=3) == [set()]  # only one complete earlier position: none
    assert banned_after(tokens, step=2, n=0) == [set()]
    assert banned_after(tokens, step=2, n=3) == [set()]  # "bos 4 4": context "4 4" not seen before


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_matches_the_rule_on_random_histories(n):
    rng = random.Random(n)
    for _ in range(200):
        step = rng.randint(0, 12)
        rows = [[BOS] + [rng.randint(2, 6) for _ in range(step)] for _ in range(3)]
        tokens = torch.tensor([r + [PAD] * 4 for r in rows])
        assert banned_after(tokens, step, n) == [banned_by_rule(r, n) for r in rows]


def test_leaves_other_scores_untouched_and_works_in_place():
    tokens = torch.tensor([[BOS, 3, 4, 3, PAD]])
    lprobs = torch.randn(1, 8)
    before = lprobs.clone()
    out = RepeatedNGramBlocker(2)(tokens, lprobs, bsz=1, beam_size=1, step=3)
    assert out is lprobs
    assert out[0, 4] == -math.inf
    keep = torch.ones(8, dtype=torch.bool)
    keep[4] = False
    assert torch.equal(out[0, keep], before[0, keep])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="no-repeat-ngram-size"):
        RepeatedNGramBlocker(-1)
    with pytest.raises(ValueError, match="rows"):
        RepeatedNGramBlocker(3)(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, 8), 1, 2, 2)
