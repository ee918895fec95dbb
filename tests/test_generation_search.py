"""fairseq's other search strategies with MuE exits on tiny models: sampling (top-k, top-p) and diverse
beam search record each returned token's exit layer, exit below full depth at low thresholds, and equal
the OFA core's generator at thresholds 1; forced prefix tokens of different lengths with the answer
trie in one batch, with a padding index that is not fairseq's usual 1."""
import pytest
import torch
from fairseq import search

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.generation.sequence_generator import OFASequenceGenerator
from tiny_models import build_pair, select, tiny_batch

MAX_LEN_B = 8
SEARCHES = {
    "sampling_topk": lambda d: search.Sampling(d, sampling_topk=5),
    "sampling_topp": lambda d: search.Sampling(d, sampling_topp=0.8),
    "diverse_beam": lambda d: search.DiverseBeamSearch(d, num_groups=2, diversity_strength=0.5),
}


@pytest.fixture(scope="module")
def models():
    return build_pair()


def run(model, dictionary, sample, strategy: str, beam: int = 4, seed: int = 11, **kwargs):
    generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_b=MAX_LEN_B, min_len=1,
                                     search_strategy=SEARCHES[strategy](dictionary), **kwargs)
    torch.manual_seed(seed)  # Sampling draws from torch's global generator
    with torch.no_grad():
        return generator.generate([model], sample)


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_search_records_exits_per_token_and_exits_early_at_low_thresholds(models, strategy):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_image_threshold=0.8, mue_text_threshold=0.8,
                         mue_decoder_threshold=0.3, mue_kv_policy="propagate", mue_full_depth_steps=0)
    try:
        hypos = run(mue, dictionary, tiny_batch(dictionary, batch=3, seed=2), strategy)
    finally:
        mue.set_exit_options(mue_image_threshold=1.0, mue_text_threshold=1.0, mue_decoder_threshold=1.0)
    depth = mue.decoder.num_layers
    layers = []
    assert len(hypos) == 3
    for sentence in hypos:
        assert len(sentence) == 4  # beam size
        for hypo in sentence:
            # one exit layer per returned token (eos included), each a real layer
            assert hypo["exit_layers"].shape == hypo["tokens"].shape
            assert hypo["exit_layers"].min() >= 1 and hypo["exit_layers"].max() <= depth
            assert len(hypo["encoder_exit_layers"]) == 2  # image and text streams
            layers += hypo["exit_layers"].tolist()
    assert min(layers) < depth, "no token exited below full depth at threshold 0.3"


@pytest.mark.parametrize("strategy", sorted(SEARCHES))
def test_search_at_thresholds_one_equals_the_ofa_core(models, strategy):
    ofa, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="joint", mue_image_threshold=1.0, mue_text_threshold=1.0,
                         mue_decoder_threshold=1.0)
    sample = tiny_batch(dictionary, batch=3, seed=5)
    ours, theirs = run(mue, dictionary, sample, strategy), run(ofa, dictionary, sample, strategy)
    for our_sentence, their_sentence in zip(ours, theirs):
        assert [h["tokens"].tolist() for h in our_sentence] == [h["tokens"].tolist() for h in their_sentence]
        for a, b in zip(our_sentence, their_sentence):
            # the same float32 operations in the same order: only summation order may differ
            assert abs(float(a["score"]) - float(b["score"])) < 1e-5
            assert a["exit_layers"].eq(mue.decoder.num_layers).all()
    # the seed matters: sampling twice with other draws gives other samples (the comparison above is not vacuous)
    if strategy.startswith("sampling"):
        other = run(ofa, dictionary, sample, strategy, seed=12)
        assert [[h["tokens"].tolist() for h in s] for s in other] != [[h["tokens"].tolist() for h in s] for s in theirs]


# ----------------------------------------------------------------------------- prefix tokens + trie
def moved_pad_pair(seed: int = 0):
    """build_pair's models over a dictionary whose padding index is 3 (unk moves to 1): code that
    takes 1 for padding reads real tokens as padding here."""
    from tiny_models import TinyTask, tiny_args, tiny_dictionary
    from mue_fairseq.models.mue_ofa import MuEOFAModel

    dictionary = tiny_dictionary()
    pad, unk = dictionary.pad_index, dictionary.unk_index
    dictionary.symbols[pad], dictionary.symbols[unk] = dictionary.symbols[unk], dictionary.symbols[pad]
    dictionary.indices = {symbol: index for index, symbol in enumerate(dictionary.symbols)}
    dictionary.pad_index, dictionary.unk_index = unk, pad
    assert dictionary.pad() == 3 and dictionary.unk() == 1
    torch.manual_seed(seed)
    model = MuEOFAModel.build_model(tiny_args("mue_ofa_tiny"), TinyTask(dictionary))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
    return model.eval(), dictionary


ANSWERS = [[10, 11], [10, 12, 13], [14], [15, 16]]


def answer_trie(dictionary) -> AnswerTrie:
    trie = AnswerTrie(dictionary.eos())
    for answer in ANSWERS:
        trie.insert(answer + [dictionary.eos()])
    return trie


def prefixed_generate(model, dictionary, sample, prefixes, trie, beam=3):
    width = max(len(p) for p in prefixes)
    prefix_tokens = torch.full((len(prefixes), width), dictionary.pad(), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        prefix_tokens[row, :len(prefix)] = torch.tensor(prefix, dtype=torch.long)
    generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_b=6, min_len=1,
                                     constraint_trie=trie)
    with torch.no_grad():
        return generator.generate([model], sample, prefix_tokens=prefix_tokens if width else None)


@pytest.mark.parametrize("decoder_threshold", [1.0, 0.3])
def test_prefix_tokens_of_different_lengths_with_the_trie_in_one_batch(decoder_threshold):
    model, dictionary = moved_pad_pair()
    model.set_exit_options(mue_decoder_threshold=decoder_threshold, mue_full_depth_steps=0)
    trie = answer_trie(dictionary)
    sample = tiny_batch(dictionary, batch=3, seed=7)
    assert sample["net_input"]["src_tokens"].eq(dictionary.pad()).any()  # padded prompts
    prefixes = [[20, 21], [], [22]]  # forced question tokens, right-padded with the dictionary's pad
    batched = prefixed_generate(model, dictionary, sample, prefixes, trie)
    answers = {tuple(a + [dictionary.eos()]) for a in ANSWERS}
    for row, (prefix, sentence) in enumerate(zip(prefixes, batched)):
        for hypo in sentence:
            tokens = hypo["tokens"].tolist()
            assert tokens[:len(prefix)] == prefix, (row, tokens)
            assert tuple(tokens[len(prefix):]) in answers, (row, tokens)  # after the prefix: one whole answer
            assert hypo["exit_layers"].shape == hypo["tokens"].shape
        # each row as if alone (its own prefix, no padding): the same hypotheses
        alone = prefixed_generate(model, dictionary, select(sample, [row]), [prefix], trie)[0]
        assert [h["tokens"].tolist() for h in sentence] == [h["tokens"].tolist() for h in alone], row
        for a, b in zip(sentence, alone):
            assert abs(float(a["score"]) - float(b["score"])) < 1e-4
    # without the trie this model says other things: the constraint did the work above
    free = prefixed_generate(model, dictionary, sample, prefixes, None)
    assert any(tuple(h["tokens"].tolist()[len(p):]) not in answers for p, s in zip(prefixes, free) for h in s)
