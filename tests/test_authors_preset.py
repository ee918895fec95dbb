"""`--mue-preset authors` against the MuE authors' own code (Tangshengku/OFA b329878).

The fixture `tests/fixtures/authors/caption_holdout.json` was recorded by
`tools/ofa_harness/authors_fixture.py`: their evaluate.py at batch 1 on the shared caption TSV and
OFA-trained checkpoint (beam 5, max-len-b 16, 3-gram blocking), observed from outside by
`authors_observe.py`: each caption with the layers their code ran (text stream, image stream,
decoder per token). Ours with the preset and the same thresholds must give exactly the same. No
authors' environment is needed here.

The settings: their caption thresholds 0.99/0.7/0.9, 0.999/0.95/0.9 (image stream at full depth,
text stops), 1/1/1 (their decoder still exits: their schedule stays below 1), and two with both
sides' residual branches scaled by 24 after loading (authors_observe.scale_residual_branches), where
decoder depths vary by step and sample (3, 2, 1) and captions differ. Not exercised by this tiny
checkpoint: the KV policy (no caption's decoder depth ever rises again after falling, so no step
reads a skipped layer's cache).
"""
import json
import math

import pytest

from ofa_fixtures import BPE_DIR, REPO, SHARED, require_file
from script_modules import load_script

FIXTURE = REPO / "tests" / "fixtures" / "authors" / "caption_holdout.json"
HARNESS = REPO / "tools" / "ofa_harness"


def harness(name: str):
    return load_script(HARNESS / f"{name}.py", f"ofa_harness_{name}")


@pytest.fixture(scope="module")
def recorded() -> dict:
    fixture = json.loads(require_file(FIXTURE).read_text())
    fixture["tsv_path"] = require_file(SHARED / "ofa_cli" / fixture["tsv"])
    fixture["checkpoint_path"] = require_file(SHARED / "ofa_reference" / fixture["checkpoint"])
    return fixture


def test_fixture_is_for_the_shared_files(recorded):
    compare = harness("compare")
    assert compare.sha256(recorded["tsv_path"]) == recorded["tsv_sha256"]
    assert compare.sha256(recorded["checkpoint_path"]) == recorded["checkpoint_sha256"]
    # Their code does stop early: each stream and the decoder run fewer layers than their most.
    samples = [s for setting in recorded["settings"] for s in setting["samples"].values()]
    for key in ("text_layers", "image_layers"):
        assert min(s[key] for s in samples) < max(s[key] for s in samples)
    decoder = [d for s in samples for d in s["decoder_layers"]]
    assert min(decoder) < max(decoder)


def test_preset_reproduces_the_authors_captions_and_exit_layers(recorded):
    tool = harness("authors_fixture")
    gen = recorded["generation"]
    for setting in recorded["settings"]:
        theirs = setting["samples"]
        ours = tool.our_samples(recorded["checkpoint_path"], recorded["tsv_path"], tuple(setting["thresholds"]),
                                gen["beam"], gen["max_len_b"], gen["no_repeat_ngram_size"], BPE_DIR,
                                setting["residual_scale"])
        report = tool.agreement(theirs, ours)
        assert report["differing"] == [], (setting["thresholds"], report,
                                           {i: (theirs[i], ours[i]) for i in report["differing"]})
        for sample_id in theirs:
            # Observed within 1e-6 (float32, another torch); keeping the image stream's relative
            # bias (their code drops it) moves scores by 1e-5 here.
            assert ours[sample_id]["score"] == pytest.approx(theirs[sample_id]["score"], abs=5e-6)


def test_authors_preset_sets_what_their_code_does():
    from mue_fairseq.exits.config import MuEConfig

    cfg = MuEConfig(mue_preset="authors", mue_decoder_threshold=0.9)
    assert cfg.decomposed and cfg.mue_batch_joint_exit and cfg.mue_drop_image_rel_bias
    assert cfg.kv_policy == "none" and cfg.policy == "similarity"
    assert (cfg.mue_decoder_beta, cfg.mue_decoder_tau) == (0.9, 1.0)
    # The paper's method stays the default.
    default = MuEConfig()
    assert (default.mue_batch_joint_exit, default.mue_drop_image_rel_bias, default.kv_policy,
            default.full_depth_steps(17)) == (False, False, "propagate", 0)


def test_authors_preset_rejects_a_conflicting_option():
    from mue_fairseq.exits.config import MuEConfig

    with pytest.raises(ValueError, match="--mue-preset authors sets --mue-kv-policy none"):
        MuEConfig(mue_preset="authors", mue_kv_policy="copy")
    with pytest.raises(ValueError, match="--mue-preset must be one of"):
        MuEConfig(mue_preset="theirs")


@pytest.mark.parametrize("max_len", range(1, 41))
def test_authors_full_depth_steps_and_schedule(max_len):
    """Their generator: full depth while step < (max_len+1)/3, then 0.9*thres + 0.1*exp(-(step+1)/(max_len+1))."""
    from mue_fairseq.exits.config import MuEConfig
    from mue_fairseq.exits.schedule import decoder_threshold

    cfg = MuEConfig(mue_preset="authors", mue_decoder_threshold=0.9)
    num_steps = max_len + 1
    assert cfg.full_depth_steps(num_steps) == sum(step < num_steps / 3 for step in range(num_steps))
    for step in range(num_steps):
        theirs = 0.9 * 0.9 + 0.1 * math.exp(-1 * (step + 1) / num_steps)
        ours = decoder_threshold(0.9, cfg.mue_decoder_beta, cfg.mue_decoder_tau, step, num_steps)
        assert ours == pytest.approx(theirs, rel=1e-15)


def test_full_depth_fraction_counts_the_steps_below_it():
    from mue_fairseq.exits.config import MuEConfig

    assert MuEConfig(mue_full_depth_steps=1 / 3).full_depth_steps(17) == 6  # 6 of 17, as their code
    assert MuEConfig(mue_full_depth_steps=0.34).full_depth_steps(17) == 6  # 5.78: steps 0..5
    assert MuEConfig(mue_full_depth_steps=0.5).full_depth_steps(18) == 9  # exactly 9: steps 0..8
    assert MuEConfig(mue_full_depth_steps=1 / 3).full_depth_steps(18) == 6  # 6.000000000000001 counts as 6
    assert MuEConfig(mue_full_depth_steps=3).full_depth_steps(17) == 3  # a count


def test_authors_preset_stops_only_above_the_threshold():
    """Their code stops when the cosine exceeds the threshold; the paper's rule is >=."""
    import torch

    from mue_fairseq.exits.config import MuEConfig
    from mue_fairseq.exits.policies import StreamExitDecider, TokenExitDecider

    new, old = torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[4.0, 3.0]]])  # cosine 24/25, exactly 0.96 in float32
    for preset, stops in (("none", True), ("authors", False)):
        cfg = MuEConfig(mue_preset=preset, mue_image_threshold=0.96, mue_decoder_threshold=0.96)
        stream = StreamExitDecider(cfg, cfg.mue_image_threshold, 0, num_layers=2)
        assert stream(0, new, old, None).tolist() == [stops]
        tokens = TokenExitDecider(cfg, num_layers=2, predict=None)
        assert tokens.begin_step(1, step=10, num_steps=17, device="cpu")
        tokens.threshold = 0.96  # this step's scheduled value, set to the cosine itself
        assert tokens(0, new[0], old[0], torch.tensor([0])).tolist() == [stops]
