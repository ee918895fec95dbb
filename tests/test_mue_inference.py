"""MuE inference invariants on tiny models: exactness when disabled, decomposition, batch
invariance, cache consistency, beam reordering and the extreme thresholds."""
import copy

import pytest
import torch

from mue_fairseq.exits.config import MuEConfig, mue_overrides
from mue_fairseq.generation.sequence_generator import OFASequenceGenerator
from tiny_models import build_pair, select, tiny_batch

KV_POLICIES = ["propagate", "copy", "recompute", "none"]
# Thresholds at which this tiny model's streams and tokens stop at mixed depths.
MIXED = dict(mue_image_threshold=0.8, mue_text_threshold=0.8, mue_decoder_threshold=0.8)


def generate(model, dictionary, sample, beam=2, max_len_b=8):
    generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_b=max_len_b, min_len=1)
    with torch.no_grad():
        return generator.generate([model], sample)


@pytest.fixture(scope="module")
def models():
    return build_pair()


def test_joint_mode_with_thresholds_at_one_equals_ofa_core(models):
    ofa, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="joint", mue_image_threshold=1.0, mue_text_threshold=1.0,
                         mue_decoder_threshold=1.0)
    sample = tiny_batch(dictionary, batch=3)
    net = sample["net_input"]
    prev = torch.cat([torch.full((3, 1), dictionary.bos()), net["src_tokens"][:, 1:4]], dim=1)
    with torch.no_grad():
        expected, _ = ofa(**net, prev_output_tokens=prev)
        actual, _ = mue(**net, prev_output_tokens=prev)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(generate(mue, dictionary, sample), generate(ofa, dictionary, sample)):
        for a, b in zip(ours, theirs):
            assert torch.equal(a["tokens"], b["tokens"])
            assert abs(float(a["score"]) - float(b["score"])) < 1e-5
            assert a["exit_layers"].eq(mue.decoder.num_layers).all()


def block_diagonal_reference(encoder, net):
    """OFA's joint encoder with image<->text attention blocked (built from the core's pieces)."""
    text_x, text_pad, text_pos = encoder.embed_text(net["src_tokens"])
    image_x, image_pad, image_ids, image_pos = encoder.embed_image_patches(net["patch_images"], net["patch_masks"])
    num_patches = image_x.size(1)
    x = torch.cat([image_x, text_x], dim=1)
    padding = torch.cat([image_pad, text_pad], dim=1)
    x = (x * (1 - padding.unsqueeze(-1).type_as(x))).transpose(0, 1)
    pos = torch.cat([encoder.image_pos_ln(image_pos), encoder.pos_ln(text_pos)], dim=1)[:1]
    block = torch.zeros(x.size(0), x.size(0))
    block[:num_patches, num_patches:] = float("-inf")
    block[num_patches:, :num_patches] = float("-inf")
    abs_bias = encoder.absolute_position_bias(pos, pos)
    for idx, layer in enumerate(encoder.layers):
        bias = abs_bias.clone() + block
        bias[:, :, num_patches:, num_patches:] += encoder.token_relative_bias(text_x.size(1), idx)
        bias[:, :, :num_patches, :num_patches] += encoder.image_relative_bias(image_ids[:1], idx)
        x = layer(x, padding, bias)
    return encoder.layer_norm(x)


def test_decomposed_encoder_equals_block_diagonal_joint_encoder(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_image_threshold=1.0, mue_text_threshold=1.0,
                         mue_decoder_threshold=1.0)
    sample = tiny_batch(dictionary, batch=3)
    with torch.no_grad():
        out = mue.encoder(**sample["net_input"])
        expected = block_diagonal_reference(mue.encoder, sample["net_input"])
    valid = ~out["encoder_padding_mask"][0].t()
    torch.testing.assert_close(out["encoder_out"][0][valid], expected[valid], atol=1e-5, rtol=1e-5)
    assert out["exit_layers"][0].eq(mue.encoder.num_layers).all()
    first, second = generate(mue, dictionary, sample), generate(mue, dictionary, sample)
    assert [h["tokens"].tolist() for hs in first for h in hs] == [h["tokens"].tolist() for hs in second for h in hs]


def test_image_less_sample_skips_its_image_stream(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", **MIXED)
    sample = tiny_batch(dictionary, batch=3, with_image=[True, False, True])
    with torch.no_grad():
        out = mue.encoder(**sample["net_input"])
    assert out["exit_layers"][0][1, 0] == 0
    assert torch.isfinite(out["encoder_out"][0]).all()
    # Its image positions are padding, and its text stream is what the sample gives alone (padding
    # trimmed): per-sample decisions, so batch neighbours with images change nothing. Same float32
    # operations on other shapes: 1e-5 is about a hundred epsilons of these O(1) states.
    width = sample["net_input"]["src_tokens"].size(1)
    text_len = int(sample["net_input"]["src_lengths"][1])
    assert out["encoder_padding_mask"][0][1, :-width].all()
    with torch.no_grad():
        alone = mue.encoder(**select(sample, [1])["net_input"])
    assert alone["exit_layers"][0][0].tolist() == out["exit_layers"][0][1].tolist()
    torch.testing.assert_close(out["encoder_out"][0][-width:][:text_len, 1], alone["encoder_out"][0][-text_len:, 0],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_policy", KV_POLICIES)
def test_batch_invariance_of_exits_and_tokens(models, kv_policy):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_kv_policy=kv_policy, **MIXED)
    sample = tiny_batch(dictionary, batch=4, seed=3)
    batched = generate(mue, dictionary, sample)
    text_layers, decoder_layers = set(), set()
    for i in range(4):
        alone = generate(mue, dictionary, select(sample, [i]))[0]
        for a, b in zip(alone, batched[i]):
            assert a["tokens"].tolist() == b["tokens"].tolist()
            assert a["exit_layers"].tolist() == b["exit_layers"].tolist()
            assert a["encoder_exit_layers"].tolist() == b["encoder_exit_layers"].tolist()
            text_layers.add(int(b["encoder_exit_layers"][1]))
            decoder_layers.update(b["exit_layers"].tolist())
    # The invariance means something only if depths actually differ inside the batch.
    assert len(text_layers) > 1 and len(decoder_layers) > 1


def run_steps(mue, dictionary, sample, steps, reorder=None, settle=True):
    """Drive the decoder incrementally over `steps` greedy steps; returns its incremental state,
    with the deferred cache entries settled unless `settle` is False."""
    state = {}
    with torch.no_grad():
        encoder_out = mue.encoder(**sample["net_input"])
        mue.decoder.begin_decoding(steps)
        tokens = torch.full((sample["id"].numel(), 1), dictionary.bos())
        for step in range(steps):
            if reorder is not None and step == reorder[0]:
                mue.decoder.reorder_incremental_state_scripting(state, reorder[1])
                encoder_out = mue.encoder.reorder_encoder_out(encoder_out, reorder[1])
                tokens = tokens.index_select(0, reorder[1])
            logits, _ = mue.decoder(tokens, encoder_out=encoder_out, incremental_state=state)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True).clamp_min(dictionary.nspecial)], dim=1)
        if settle:
            mue.decoder.settle_caches(state)
    return state


@pytest.mark.parametrize("kv_policy", KV_POLICIES)
def test_every_layer_cache_has_one_entry_per_position(models, kv_policy):
    _, mue, dictionary = models
    mue.set_exit_options(mue_kv_policy=kv_policy, **MIXED)
    sample = tiny_batch(dictionary, batch=3)
    steps = 6
    state = run_steps(mue, dictionary, sample, steps)
    record = mue.decoder.exit_record(state)
    assert record.shape == (3, steps) and (record < mue.decoder.num_layers).any()
    for layer in mue.decoder.layers:
        buffer = layer.self_attn._get_input_buffer(state)
        assert buffer["prev_key"].shape[:3] == (3, 4, steps)
        pad = buffer.get("prev_key_padding_mask")
        if kv_policy == "none":
            # a hole exactly where a token stopped before this layer
            holes = record <= list(mue.decoder.layers).index(layer)
            assert torch.equal(pad, holes) if pad is not None else not holes.any()
        else:
            assert pad is None or not pad.any()


def test_propagated_entries_are_the_skipped_layers_own_projections(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_kv_policy="propagate", mue_decoder_threshold=0.0)  # every token stops at layer 1
    sample = tiny_batch(dictionary, batch=2)
    state = run_steps(mue, dictionary, sample, 3)
    assert mue.decoder.exit_record(state).eq(1).all()
    # The exit state of step 0 is layer 1's output for bos, as a full-depth pass computes it.
    mue.set_exit_options(mue_decoder_threshold=1.0)
    with torch.no_grad():
        encoder_out = mue.encoder(**sample["net_input"])
        bos = torch.full((2, 1), dictionary.bos())
        _, extra = mue.decoder(bos, encoder_out=encoder_out, features_only=True)
        exit_state = extra["inner_states"][1]
        for skipped in mue.decoder.layers[1:]:
            k, v = skipped.self_attn.project_key_value(skipped.self_attn_layer_norm(exit_state))
            cached = skipped.self_attn._get_input_buffer(state)
            torch.testing.assert_close(cached["prev_key"][:, :, :1], k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cached["prev_value"][:, :, :1], v, atol=1e-5, rtol=1e-5)


def snapshot(mue, state):
    caches = [layer.self_attn._get_input_buffer(state)["prev_key"].clone() for layer in mue.decoder.layers]
    return caches, mue.decoder.exit_record(state).clone()


def test_beam_reordering_moves_caches_and_exit_records_together(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_kv_policy="propagate", **MIXED)
    sample = tiny_batch(dictionary, batch=3)
    # Reordered before settling, so the deferred entries' exit states must move with the rows too.
    state = run_steps(mue, dictionary, sample, 4, settle=False)
    reference = copy.deepcopy(state)
    mue.decoder.settle_caches(reference)
    caches, record = snapshot(mue, reference)
    order = torch.tensor([1, 1, 0])  # beam search may duplicate a row and drop another
    mue.decoder.reorder_incremental_state_scripting(state, order)
    mue.decoder.settle_caches(state)
    moved_caches, moved_record = snapshot(mue, state)
    assert torch.equal(moved_record, record.index_select(0, order))
    for before, after in zip(caches, moved_caches):
        assert torch.equal(after, before.index_select(0, order))


def test_deferred_propagation_equals_step_by_step_propagation(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_kv_policy="propagate", **MIXED)
    sample = tiny_batch(dictionary, batch=3, seed=3)
    # One row: a layer that its token skips is skipped by the whole batch, so its entry waits.
    # At batch 3 (and with beams) rows stop at different layers: deferred and step-by-step
    # entries mix in one cache.
    lagging = run_steps(mue, dictionary, select(sample, [0]), 6, settle=False)
    record = mue.decoder.exit_record(lagging)
    lengths = [layer.self_attn._get_input_buffer(lagging).get("prev_key", torch.zeros(1, 1, 0)).size(2)
               for layer in mue.decoder.layers]
    assert record.max() < mue.decoder.num_layers and lengths[-1] < 6  # the deepest layer waited
    assert lengths[0] == 6  # every token ran the first layer
    mue.decoder.defer_skipped_kv = False
    try:
        eager = run_steps(mue, dictionary, sample, 6, settle=False)
        eager_hypos = generate(mue, dictionary, sample)
    finally:
        mue.decoder.defer_skipped_kv = True
    deferred = run_steps(mue, dictionary, sample, 6)
    deferred_hypos = generate(mue, dictionary, sample)
    assert torch.equal(mue.decoder.exit_record(deferred), mue.decoder.exit_record(eager))
    for ours, theirs in zip(snapshot(mue, deferred)[0], snapshot(mue, eager)[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(deferred_hypos, eager_hypos):
        for a, b in zip(ours, theirs):
            assert a["tokens"].tolist() == b["tokens"].tolist()
            assert a["exit_layers"].tolist() == b["exit_layers"].tolist()
            assert abs(float(a["score"]) - float(b["score"])) < 1e-5


def test_shrinking_batch_continues_like_a_fresh_run(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_kv_policy="propagate", **MIXED)
    sample = tiny_batch(dictionary, batch=3)
    keep = torch.tensor([2, 0])  # a finished sentence leaves the batch after step 2
    continued = run_steps(mue, dictionary, sample, 5, reorder=(2, keep))
    fresh = run_steps(mue, dictionary, select(sample, keep), 5)
    assert torch.equal(mue.decoder.exit_record(continued), mue.decoder.exit_record(fresh))
    for layer in mue.decoder.layers:
        for attn in (layer.self_attn, layer.encoder_attn):
            ours, theirs = attn._get_input_buffer(continued), attn._get_input_buffer(fresh)
            if "prev_key" in ours and "prev_key" in theirs:  # encoder keys are made on first use only
                torch.testing.assert_close(ours["prev_key"], theirs["prev_key"], atol=1e-5, rtol=1e-5)


def test_thresholds_at_zero_stop_every_stream_after_its_first_layer(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_image_threshold=0.0, mue_text_threshold=0.0,
                         mue_decoder_threshold=0.0, mue_kv_policy="propagate", mue_full_depth_steps=0)
    hypos = generate(mue, dictionary, tiny_batch(dictionary, batch=3))
    for sentence in hypos:
        for hypo in sentence:
            assert hypo["encoder_exit_layers"].tolist() == [1, 1]
            assert hypo["exit_layers"].eq(1).all()


def test_full_depth_steps_keep_the_first_steps_deep(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_decoder_threshold=0.0, mue_full_depth_steps=3)
    hypo = generate(mue, dictionary, tiny_batch(dictionary, batch=1), beam=1)[0][0]
    assert hypo["exit_layers"][:3].eq(mue.decoder.num_layers).all()
    assert hypo["exit_layers"][3:].eq(1).all()
    mue.set_exit_options(mue_full_depth_steps=0)


def test_training_mode_runs_full_depth(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_image_threshold=0.0, mue_text_threshold=0.0, mue_decoder_threshold=0.0)
    sample = tiny_batch(dictionary, batch=2)
    mue.train()
    try:
        out = mue.encoder(**sample["net_input"])
    finally:
        mue.eval()
    assert out["exit_layers"][0].eq(mue.encoder.num_layers).all()


def test_teacher_forced_groups_stop_together(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_decoder_threshold=0.8, mue_image_threshold=1.0, mue_text_threshold=1.0)
    sample = tiny_batch(dictionary, batch=2)
    with torch.no_grad():
        encoder_out = mue.encoder(**sample["net_input"])
        order = torch.tensor([0, 0, 0, 1, 1, 1])
        encoder_out = mue.encoder.reorder_encoder_out(encoder_out, order)
        prev = torch.randint(4, len(dictionary), (6, 5))
        _, extra = mue.decoder(prev, encoder_out=encoder_out, exit_groups=order)
    layers = extra["exit_layers"][0]
    assert layers[:3].unique().numel() == 1 and layers[3:].unique().numel() == 1


@pytest.mark.parametrize("name,value", [("mue_image_threshold", 1.5), ("mue_text_threshold", -0.1),
                                        ("mue_decoder_threshold", 2.0), ("mue_decoder_beta", 1.2)])
def test_thresholds_outside_unit_interval_are_refused(name, value):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=f"{flag} must be in \\[0, 1\\], got {value}"):
        MuEConfig(**{name: value})
    with pytest.raises(ValueError, match=flag):
        mue_overrides(**{name: value})


def test_unknown_kv_policy_is_refused():
    with pytest.raises(ValueError, match="--mue-kv-policy must be one of"):
        MuEConfig(mue_kv_policy="teleport")


@pytest.mark.parametrize("options,expected_decoder", [
    (dict(mue_exit_policy="static", mue_static_image_layers=2, mue_static_text_layers=1,
          mue_static_decoder_layers=2), 2),
    (dict(mue_exit_policy="entropy", mue_entropy_threshold=100.0), 1),
    (dict(mue_exit_policy="confidence", mue_confidence_threshold=0.0), 1),
])
def test_baseline_policies_stop_where_their_rule_says(models, options, expected_decoder):
    _, mue, dictionary = models
    mue.set_exit_options(mue_image_threshold=1.0, mue_text_threshold=1.0, mue_decoder_threshold=1.0, **options)
    try:
        hypos = generate(mue, dictionary, tiny_batch(dictionary, batch=2))
    finally:
        mue.set_exit_options(mue_exit_policy="similarity", mue_static_image_layers=0, mue_static_text_layers=0,
                             mue_static_decoder_layers=0)
    static = options.get("mue_exit_policy") == "static"
    for hypo in (h for sentence in hypos for h in sentence):
        assert hypo["exit_layers"].eq(expected_decoder).all()
        expected_encoder = [2, 1] if static else [mue.encoder.num_layers] * 2
        assert hypo["encoder_exit_layers"].tolist() == expected_encoder


def test_patience_needs_that_many_agreeing_layers(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_exit_policy="patience", mue_patience=1)
    try:
        state = run_steps(mue, dictionary, tiny_batch(dictionary, batch=3), 4)
    finally:
        mue.set_exit_options(mue_exit_policy="similarity", mue_patience=0)
    # The first layer has no predecessor to agree with: patience 1 stops at layer 2 at the earliest.
    assert mue.decoder.exit_record(state).ge(2).all()


def test_all_hiddens_cover_every_layer_when_streams_stop_early(models):
    _, mue, dictionary = models
    mue.set_exit_options(mue_encoder_mode="decomposed", mue_image_threshold=0.0, mue_text_threshold=0.0)
    sample = tiny_batch(dictionary, batch=2)
    with torch.no_grad():
        out = mue.encoder(**sample["net_input"], return_all_hiddens=True)
    states = out["encoder_states"]
    assert len(states) == mue.encoder.num_layers + 1
    assert out["exit_layers"][0].eq(1).all()
    # Stopped after layer 1: the later states repeat it.
    assert all(torch.equal(states[1], later) for later in states[2:])


@pytest.mark.parametrize("policy", ["confidence", "patience", "entropy"])
def test_teacher_forced_prediction_policies_judge_the_named_position(models, policy):
    """Each row stops at the first layer whose prediction at its exit position passes the rule,
    as computed from the full-depth layer states; rows of a group stop when all of them pass."""
    _, mue, dictionary = models
    sample = tiny_batch(dictionary, batch=2)
    order = torch.tensor([0, 0, 1, 1])
    prev = torch.randint(4, len(dictionary), (4, 6), generator=torch.Generator().manual_seed(3))
    positions = torch.tensor([2, 4, 1, 5])
    mue.set_exit_options(mue_image_threshold=1.0, mue_text_threshold=1.0, mue_decoder_threshold=1.0,
                         mue_exit_policy="static", mue_static_decoder_layers=0)
    with torch.no_grad():
        encoder_out = mue.encoder.reorder_encoder_out(mue.encoder(**sample["net_input"]), order)
        _, full = mue.decoder(prev, encoder_out=encoder_out, features_only=True, return_all_hiddens=True)
        layer_states = full["inner_states"][1:]  # T x rows x C after each layer
        probs = torch.stack([mue.decoder.predict(s[positions, torch.arange(4)]).float().softmax(-1)
                             for s in layer_states])  # layers x rows x V
    top = probs.max(-1)
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    # Thresholds that let one group pass at layer 1 (by a margin), so depths differ between groups.
    if policy == "confidence":
        value = float(top.values[0, order.eq(0)].min()) - 1e-4
        passes = top.values >= value
        options = dict(mue_confidence_threshold=value)
    elif policy == "entropy":
        value = float(entropy[0, order.eq(1)].max()) + 1e-4
        passes = entropy <= value
        options = dict(mue_entropy_threshold=value)
    else:
        passes = torch.zeros_like(top.indices, dtype=torch.bool)
        passes[1:] = top.indices[1:].eq(top.indices[:-1])
        options = dict(mue_patience=1)
    passes[-1] = True  # the last layer always ends the row
    # A group stops at the first layer where all of its rows pass.
    group_passes = torch.stack([passes[:, order.eq(g)].all(dim=1) for g in order], dim=1)  # layers x rows
    expected = group_passes.float().argmax(0) + 1
    assert expected.unique().numel() > 1, "the groups should stop at different depths"
    mue.set_exit_options(mue_exit_policy=policy, **options)
    try:
        with torch.no_grad():
            _, extra = mue.decoder(prev, encoder_out=encoder_out, exit_groups=order, exit_positions=positions,
                                   features_only=True)
    finally:
        mue.set_exit_options(mue_exit_policy="similarity", mue_confidence_threshold=1.0, mue_entropy_threshold=0.0,
                             mue_patience=0)
    assert extra["exit_layers"][0].tolist() == expected.tolist()


def test_ensemble_refuses_exits_and_runs_without_them():
    """An ensemble averages every step over its models, so exits are refused with a clear error; at full
    depth the ensemble of two copies of a model gives that model's tokens."""
    _, first, dictionary = build_pair(seed=0)
    _, second, _ = build_pair(seed=0)
    sample = tiny_batch(dictionary, batch=2, seed=4)
    for model in (first, second):
        model.set_exit_options(mue_encoder_mode="joint", mue_image_threshold=1.0, mue_text_threshold=1.0,
                               mue_decoder_threshold=1.0)
    generator = OFASequenceGenerator([first, second], dictionary, beam_size=2, max_len_b=6, min_len=1)
    with torch.no_grad():
        ensemble = generator.generate([first, second], sample)
    alone = generate(first, dictionary, sample, max_len_b=6)
    for ours, single in zip(ensemble, alone):
        assert [h["tokens"].tolist() for h in ours] == [h["tokens"].tolist() for h in single]
    second.set_exit_options(mue_decoder_threshold=0.5)
    with pytest.raises(ValueError, match="MuE exits work with one model, not an ensemble of 2"):
        with torch.no_grad():
            generator.generate([first, second], sample)


@pytest.mark.parametrize("policy", ["entropy", "confidence", "patience"])
def test_prediction_policies_judge_only_the_tokens_the_generator_may_emit(policy):
    """With an answer trie or a location-token range, the generator renormalises over the allowed
    tokens; the prediction-based policies must judge that distribution, not the whole vocabulary's."""
    from mue_fairseq.exits.policies import TokenExitDecider

    vocab, rows = 1000, torch.tensor([0, 2])
    logits = torch.zeros(2, vocab)
    logits[:, 7] = 3.0  # over the whole vocabulary token 7 gets p = 0.02 and the entropy is ~6.9 nats
    allowed = torch.zeros(3, vocab, dtype=torch.bool)
    allowed[:, [7, 8]] = True  # two allowed tokens: p(7) = 0.95, entropy 0.2 nats
    options = {"entropy": dict(mue_entropy_threshold=0.5), "confidence": dict(mue_confidence_threshold=0.9),
               "patience": dict(mue_patience=1)}[policy]
    cfg = MuEConfig(mue_exit_policy=policy, **options)
    free = TokenExitDecider(cfg, 4, lambda states: logits, allowed=None)
    judged = TokenExitDecider(cfg, 4, lambda states: logits, allowed=allowed)
    states = torch.zeros(2, 8)
    if policy == "patience":  # the argmax moves from 11 (outside the allowed pair) to 7 only when free
        logits[:, 11] = 5.0
        for decider in (free, judged):
            decider.start_rows(3, "cpu")
            decider(0, states, states, rows)
        logits[:, 11] = 0.0
        assert not free(1, states, states, rows).any() and judged(1, states, states, rows).all()
        return
    assert not free(0, states, states, rows).any()
    assert judged(0, states, states, rows).all()
