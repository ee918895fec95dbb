"""The OFA core reproduces what OFA's own code computed from checkpoints written by OFA's trainer.

The checkpoints load strictly through fairseq with their own recorded config and task; every
float tensor is compared at atol/rtol 1e-5, integer tensors and token ids exactly.
"""
import argparse

import pytest
import torch
from fairseq import checkpoint_utils

from mue_fairseq.exits.config import mue_overrides
from mue_fairseq.ofa.checkpoint import check_is_ofa_checkpoint, load_ofa_ensemble
from ofa_fixtures import BPE_DIR, FIXTURE_NAMES, load_fixture_model, load_reference, require_fixture

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def fixture(request):
    name = request.param
    require_fixture(name)
    torch.set_num_threads(1)
    model, cfg, task = load_fixture_model(name)
    return name, model, task, load_reference(name)


def net_input(ref, patch_masks=None):
    return dict(
        src_tokens=ref["src_tokens"], src_lengths=ref["src_lengths"], patch_images=ref["patch_images"],
        patch_masks=ref["patch_masks"] if patch_masks is None else patch_masks,
    )


def test_encoder_matches_ofa(fixture):
    _, model, _, ref = fixture
    with torch.no_grad():
        out = model.encoder(**net_input(ref), return_all_hiddens=True)
    torch.testing.assert_close(out["encoder_out"][0], ref["encoder_out"], **TOL)
    assert torch.equal(out["encoder_padding_mask"][0], ref["encoder_padding_mask"])
    torch.testing.assert_close(torch.stack(out["encoder_states"]), ref["encoder_states"], **TOL)
    torch.testing.assert_close(out["position_embeddings"][0], ref["encoder_position_embeddings"], **TOL)


def test_image_less_sample_matches_ofa(fixture):
    _, model, _, ref = fixture
    with torch.no_grad():
        out = model.encoder(**net_input(ref, ref["masked_patch_masks"]))
        features, _ = model(**net_input(ref, ref["masked_patch_masks"]),
                            prev_output_tokens=ref["prev_output_tokens"], features_only=True)
    torch.testing.assert_close(out["encoder_out"][0], ref["masked_encoder_out"], **TOL)
    assert torch.equal(out["encoder_padding_mask"][0], ref["masked_encoder_padding_mask"])
    torch.testing.assert_close(features, ref["masked_decoder_features"], **TOL)


def test_teacher_forced_decoder_matches_ofa(fixture):
    _, model, _, ref = fixture
    with torch.no_grad():
        logits, extra = model(**net_input(ref), prev_output_tokens=ref["prev_output_tokens"], return_all_hiddens=True)
        features, _ = model(**net_input(ref), prev_output_tokens=ref["prev_output_tokens"], features_only=True)
    torch.testing.assert_close(features, ref["decoder_features"], **TOL)
    torch.testing.assert_close(torch.stack(extra["inner_states"]), ref["decoder_inner_states"], **TOL)
    torch.testing.assert_close(extra["attn"][0], ref["decoder_attn"], **TOL)
    if "decoder_logits" in ref:
        torch.testing.assert_close(logits, ref["decoder_logits"], **TOL)
    else:
        torch.testing.assert_close(logits[:, -3:], ref["decoder_logits_tail"], **TOL)
    torch.testing.assert_close(logits[..., ref["logit_vocab_ids"]], ref["decoder_logits_sel"], **TOL)
    torch.testing.assert_close(logits.logsumexp(-1), ref["decoder_logits_lse"], **TOL)
    torch.testing.assert_close(logits.max(-1).values, ref["decoder_logits_max"], **TOL)
    assert torch.equal(logits.argmax(-1), ref["decoder_logits_argmax"])
    log_probs = torch.log_softmax(logits, -1).gather(-1, ref["target"].unsqueeze(-1)).squeeze(-1)
    log_probs = log_probs.masked_fill(ref["target"].eq(model.decoder.padding_idx), 0)
    torch.testing.assert_close(log_probs, ref["target_token_logprobs"], **TOL)


@pytest.mark.parametrize("beam", [2, 1])
def test_generation_matches_ofa(fixture, beam):
    _, model, task, ref = fixture
    key = f"generate_beam{beam}"
    args = ref[f"{key}_args"]
    gen_args = argparse.Namespace(beam=beam, max_len_a=args["max_len_a"], max_len_b=args["max_len_b"],
                                  min_len=args["min_len"], lenpen=args["lenpen"], unkpen=args["unkpen"],
                                  temperature=args["temperature"], unnormalized=args["unnormalized"],
                                  no_repeat_ngram_size=args["no_repeat_ngram_size"])
    generator = task.build_generator([model], gen_args)
    sample = {"id": torch.tensor(ref["ids"]), "net_input": net_input(ref)}
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    for ours, theirs in zip(hypos, ref[key]):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert torch.equal(a["tokens"], b["tokens"])
            assert abs(float(a["score"]) - b["score"]) < 1e-5
            torch.testing.assert_close(a["positional_scores"], b["positional_scores"], **TOL)


def test_mue_model_with_exits_disabled_reproduces_ofa(fixture):
    """mue_ofa loads the same file strictly; joint encoder and thresholds at 1 give OFA's outputs."""
    name, _, task, ref = fixture
    model, _, _ = load_fixture_model(name, mue_overrides(mue_encoder_mode="joint"))
    assert type(model).__name__ == "MuEOFAModel"
    with torch.no_grad():
        logits, _ = model(**net_input(ref), prev_output_tokens=ref["prev_output_tokens"])
        generator = task.build_generator([model], argparse.Namespace(beam=2, max_len_a=0, max_len_b=10, min_len=1))
        hypos = generator.generate([model], {"id": torch.tensor(ref["ids"]), "net_input": net_input(ref)})
    torch.testing.assert_close(logits[..., ref["logit_vocab_ids"]], ref["decoder_logits_sel"], **TOL)
    for ours, theirs in zip(hypos, ref["generate_beam2"]):
        assert [h["tokens"].tolist() for h in ours] == [h["tokens"].tolist() for h in theirs]


# ----------------------------------------------------------------------------- bad checkpoints
def test_missing_key_is_an_error_naming_the_key(tmp_path):
    checkpoint, _ = require_fixture("caption")
    state = torch.load(checkpoint, weights_only=True)
    del state["model"]["decoder.layers.0.fc1.bias"]
    broken = tmp_path / "missing_key.pt"
    torch.save(state, broken)
    with pytest.raises(RuntimeError, match="decoder.layers.0.fc1.bias"):
        checkpoint_utils.load_model_ensemble_and_task([str(broken)], arg_overrides={"bpe_dir": str(BPE_DIR)})


def test_unexpected_key_is_an_error_naming_the_key(tmp_path):
    checkpoint, _ = require_fixture("caption")
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["encoder.extra_head.weight"] = torch.zeros(2)
    broken = tmp_path / "extra_key.pt"
    torch.save(state, broken)
    with pytest.raises(RuntimeError, match="encoder.extra_head.weight"):
        checkpoint_utils.load_model_ensemble_and_task([str(broken)], arg_overrides={"bpe_dir": str(BPE_DIR)})


def test_dictionary_size_mismatch_is_a_clear_error():
    checkpoint, _ = require_fixture("caption")
    with pytest.raises(ValueError, match="encoder.embed_tokens.weight has 59457 rows but the task dictionary has 59357"):
        checkpoint_utils.load_model_ensemble_and_task(
            [str(checkpoint)], arg_overrides={"bpe_dir": str(BPE_DIR), "num_bins": 900}
        )


def test_non_ofa_checkpoint_is_refused(tmp_path):
    checkpoint, _ = require_fixture("caption")
    state = torch.load(checkpoint, weights_only=True)
    state["cfg"]["model"].arch = state["cfg"]["model"]._name = "transformer"
    other = tmp_path / "transformer.pt"
    torch.save(state, other)
    with pytest.raises(ValueError, match="transformer.pt: checkpoint architecture 'transformer' is not an OFA model"):
        load_ofa_ensemble([str(other)], arg_overrides={"bpe_dir": str(BPE_DIR)})
    with pytest.raises(ValueError, match="x.pt: not an OFA checkpoint: no .model. entry"):
        check_is_ofa_checkpoint("x.pt", {"weights": 1}, ["ofa"])
