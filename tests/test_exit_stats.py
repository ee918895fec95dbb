"""Exit statistics, the FLOP model and the histogram plots, on a tiny MuE model.

FLOP values are checked two ways: against numbers worked out by hand below (the arithmetic is
in the comments), and against torch's own FLOP counter run over a real generation.
"""
import json
from argparse import Namespace
from dataclasses import replace

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.logging import metrics
from fairseq.models import ARCH_CONFIG_REGISTRY
from torch.utils.flop_counter import FlopCounterMode

import mue_fairseq  # noqa: F401  (registers the models)
from mue_fairseq.generation.sequence_generator import OFASequenceGenerator
from mue_fairseq.metrics import flops as F
from mue_fairseq.metrics.exit_stats import ExitStatistics
from mue_fairseq.metrics.plots import plot_exit_histograms
from mue_fairseq.models.mue_ofa import MuEOFAModel
from mue_fairseq.ofa.resnet import build_resnet

torch.set_num_threads(1)
LAYERS = 3
IMAGE_SIZE = 32  # -> 2 x 2 = 4 patches
SRC_LEN = 5
NEW_TOKENS = 4  # min_len = max_len_b = 4: every hypothesis has 4 tokens + eos


class FakeTask:
    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def tiny_dictionary() -> Dictionary:
    dictionary = Dictionary()
    for i in range(50):
        dictionary.add_symbol(f"w{i}")
    return dictionary  # 54 symbols


def build_tiny_mue(dictionary: Dictionary, **options) -> MuEOFAModel:
    torch.manual_seed(0)
    args = Namespace(
        encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_layers=LAYERS, decoder_attention_heads=4, resnet_type="resnet18", token_bucket_size=16,
        image_bucket_size=8, scale_attn=True, scale_fc=True, scale_heads=True, disable_entangle=True, **options,
    )
    ARCH_CONFIG_REGISTRY["mue_ofa_tiny"](args)
    return MuEOFAModel.build_model(args, FakeTask(dictionary)).eval()


def make_sample(batch: int) -> dict:
    generator = torch.Generator().manual_seed(3)
    src = torch.randint(4, 54, (batch, SRC_LEN), generator=generator)
    src[:, 0], src[:, -1] = 0, 2
    return {
        "id": torch.arange(10, 10 + batch),
        "net_input": {
            "src_tokens": src,
            "src_lengths": torch.full((batch,), SRC_LEN),
            "patch_images": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
            "patch_masks": torch.ones(batch, dtype=torch.bool),
        },
    }


def generate(model, dictionary, sample, beam=1):
    generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0,
                                     max_len_b=NEW_TOKENS, min_len=NEW_TOKENS)
    with torch.no_grad():
        return generator.generate([model], sample)


@pytest.fixture(scope="module")
def dictionary():
    return tiny_dictionary()


# ----------------------------------------------------------------------------- FLOP formulas
def test_flop_primitives_by_hand():
    assert F.linear_flops(3, 4, 5) == 120
    # ResNet conv1 at 224 px: 3*64*7*7 MACs per output pixel, 112 x 112 pixels.
    assert F.conv2d_flops(3, 64, 7, 112, 112) == 2 * 118_013_952
    assert [F.resnet_grid_size(s) for s in (480, 384, 256, 32)] == [30, 24, 16, 2]
    assert F.num_image_patches(480) == 900
    # T=4 tokens, d=32, F=64: projections 4*4*32*32 = 16384, scores 2*4*4*32 = 1024,
    # FFN 2*4*32*64 = 16384 -> 33792 MACs.
    assert F.encoder_layer_flops(4, 32, 64) == 2 * 33_792
    # Cross-modal context: 4 queries over 9 keys changes only the scores: 2*4*9*32 = 2304.
    assert F.encoder_layer_flops(4, 32, 64, context=9) == 2 * (16_384 + 2_304 + 16_384)
    # Step 2 (3 cached keys), memory 10: self 4*1024 + 2*3*32, cross 2*1024 + 2*10*32, FFN 2*32*64.
    assert F.decoder_token_layer_flops(2, 10, 32, 64) == 2 * (4_096 + 192 + 2_048 + 640 + 4_096)
    assert F.cross_kv_flops(9, 32) == 2 * 18_432
    assert F.output_projection_flops(32, 54) == 2 * 1_728
    assert F.propagate_kv_flops(32) == 2 * 2_048
    # 5 x 5 text positions: two projections 2*5*1024 + product 5*5*32.
    assert F.position_bias_flops(5, 5, 32) == 2 * 11_040


def test_resnet_flops_by_hand_and_by_counter():
    # OFA's "resnet18" = Bottleneck blocks [2, 2, 2] at 32 px (MACs):
    #   stem 3*64*49*16*16                               =  2,408,448
    #   stage 1 (8x8):   block 0 4,718,592 + block 1 4,456,448 =  9,175,040
    #   stage 2 (->4x4): block 0 7,602,176 + block 1 4,456,448 = 12,058,624
    #   stage 3 (->2x2): block 0 7,602,176 + block 1 4,456,448 = 12,058,624
    assert F.resnet_flops("resnet18", 32) == 2 * 35_700_736
    for resnet_type, size in (("resnet18", 32), ("resnet50", 100)):
        resnet = build_resnet(resnet_type, False, 0.0).eval().to("meta")  # shapes only, no arithmetic
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            resnet(torch.zeros(1, 3, size, size, device="meta"))
        assert F.resnet_flops(resnet_type, size) == counter.get_total_flops(), resnet_type
    # The stem of OFA-Base at 480 px, about 32 GMACs (MUE_SPEC A.3).
    assert 31.5e9 < F.resnet_flops("resnet101", 480) / 2 < 32.5e9
    with pytest.raises(ValueError, match="unknown resnet type"):
        F.resnet_flops("resnet999", 32)


# ----------------------------------------------------------------------------- exits on a tiny model
def test_thresholds_at_zero_exit_after_the_first_layer(dictionary):
    # beta = 1 makes the decoder threshold Theta(t) exactly the threshold (0) at every step.
    model = build_tiny_mue(dictionary, mue_image_threshold=0.0, mue_text_threshold=0.0,
                           mue_decoder_threshold=0.0, mue_decoder_beta=1.0)
    sample = make_sample(3)
    hypos = generate(model, dictionary, sample, beam=2)
    stats = ExitStatistics.for_model(model)
    stats.add_generated(sample, hypos)
    assert [s.sample_id for s in stats.samples] == [10, 11, 12]
    for record in stats.samples:
        assert (record.image_layers, record.text_layers) == (1, 1)
        assert record.decoder_layers == [1] * (NEW_TOKENS + 1)
    summary = stats.summary()
    assert summary["mean_exit_layers"] == {"image": 1.0, "text": 1.0, "decoder": 1.0, "decoder_per_sample": 1.0}
    assert summary["histograms"] == {"image": [0, 3, 0, 0], "text": [0, 3, 0, 0], "decoder": [0, 15, 0, 0]}
    reductions = summary["time_reduction_layers"]
    for key in ("image", "text", "decoder", "decoder_step_weighted", "combined"):
        assert reductions[key] == pytest.approx(2 / 3)

    # Thresholds at 1: full depth everywhere, nothing saved.
    model.set_exit_options(mue_image_threshold=1.0, mue_text_threshold=1.0, mue_decoder_threshold=1.0)
    full = ExitStatistics.for_model(model)
    full.add_generated(sample, generate(model, dictionary, sample, beam=2))
    assert full.summary()["histograms"]["decoder"] == [0, 0, 0, 15]
    assert all(v == 0 for v in full.layer_time_reduction().values())


STATIC = dict(mue_exit_policy="static", mue_static_image_layers=2, mue_static_text_layers=1,
              mue_static_decoder_layers=2)

# Per-sample FLOPs of the static model (image 2, text 1, decoder 2 of 3 layers) on make_sample(2)
# with beam 1, worked out by hand: d=32, F=64, V=54, 4 patches, 5 text tokens, memory S=9,
# 5 generated tokens (steps 0..4), batch 2 (per-batch position biases are split in two).
HAND_FLOPS = {
    # ResNet 71,401,472 + patch projection 2*4*1024*32 = 262,144
    "resnet": 71_663_616,
    # 2 layers x 67,584 (T = 4)
    "image_stream": 135_168,
    # 1 layer, T = 5: 4*5*1024 + 2*5*5*32 + 2*5*32*64 = 42,560 MACs
    "text_stream": 85_120,
    # 2 layers x sum_s (10,816 + 64*(s+1)) MACs = 2 x 55,040 MACs
    "decoder_layers": 220_160,
    # layers 1-2 reached: 2 x 2*9*32*32 MACs
    "cross_kv": 73_728,
    # 5 tokens x 32*54 MACs
    "output_projection": 17_280,
    # propagate, deferred: no token runs layer 3 again, so its keys/values are never projected
    "exit_extras": 0,
    # per batch, split over its 2 samples: text 11,040 + image 8,704 MACs = 39,488 FLOPs
    "encoder_position_bias": 19_744,
    # per batch: sum_s (2048 + 1056*(s+1)) = 26,080 MACs = 52,160 FLOPs, half per sample;
    # per row: cross-bias keys 9*1024 + 5 steps x 9*32 = 10,656 MACs = 21,312 FLOPs
    "decoder_position_bias": 26_080 + 21_312,
}


def test_static_exits_statistics_and_flops_by_hand(dictionary):
    model = build_tiny_mue(dictionary, **STATIC)
    sample = make_sample(2)
    with FlopCounterMode(display=False) as counter:
        hypos = generate(model, dictionary, sample)
    stats = ExitStatistics.for_model(model, image_size=IMAGE_SIZE)
    stats.add_generated(sample, hypos)

    summary = stats.summary()
    assert summary["num_samples"] == 2 and summary["num_decoder_tokens"] == 10
    assert summary["histograms"] == {"image": [0, 0, 2, 0], "text": [0, 2, 0, 0], "decoder": [0, 0, 10, 0]}
    reductions = summary["time_reduction_layers"]
    assert reductions["image"] == pytest.approx(1 / 3)
    assert reductions["text"] == pytest.approx(2 / 3)
    assert reductions["decoder"] == pytest.approx(1 / 3)
    assert reductions["decoder_step_weighted"] == pytest.approx(1 / 3)
    assert reductions["combined"] == pytest.approx(1 - (2 + 1 + 2) / 9)

    for record in stats.samples:
        assert record.flops == pytest.approx(HAND_FLOPS)
        assert record.text_length == SRC_LEN and record.batch_size == 2
    # The model's prediction equals what torch counts while the model generates.
    assert sum(sum(r.flops.values()) for r in stats.samples) == counter.get_total_flops()

    flops = summary["time_reduction_flops"]
    executed = 2 * sum(HAND_FLOPS.values())
    assert flops["executed"] == pytest.approx(executed)
    assert flops["components"]["image_stream"]["reduction"] == pytest.approx(1 / 3)
    assert flops["components"]["text_stream"]["reduction"] == pytest.approx(2 / 3)
    assert flops["components"]["resnet"]["reduction"] == 0
    assert flops["reduction"] == pytest.approx(1 - executed / flops["full"])
    assert flops["ideal_speedup"] == pytest.approx(flops["full"] / executed)
    # Full depth: 3 image and 3 text layers, every token through 3 layers, no extras.
    full = 2 * (71_663_616 + 3 * 67_584 + 3 * 85_120 + 3 * 110_080 + 3 * 36_864 + 17_280 + 67_136)
    assert flops["full"] == pytest.approx(full)
    encoder_full = 2 * (71_663_616 + 3 * 67_584 + 3 * 85_120 + 19_744)
    assert flops["encoder"]["full"] == pytest.approx(encoder_full)
    assert flops["decoder"]["full"] == pytest.approx(full - encoder_full)


def test_full_depth_flop_references_match_the_counter(dictionary):
    """The full-depth references price MuE at thresholds 1 and OFA's joint encoder exactly."""
    sample = make_sample(2)
    model = build_tiny_mue(dictionary)
    stats = ExitStatistics.for_model(model, image_size=IMAGE_SIZE)
    with FlopCounterMode(display=False) as counter:
        hypos = generate(model, dictionary, sample)
    stats.add_generated(sample, hypos)
    assert stats.flop_summary()["executed"] == stats.flop_summary()["full"] == counter.get_total_flops()

    model.set_exit_options(mue_encoder_mode="joint")
    with FlopCounterMode(display=False) as counter:
        generate(model, dictionary, sample)
    assert stats.flop_summary()["full_ofa"] == counter.get_total_flops()
    joint = F.OFAFlopModel.from_model(model, IMAGE_SIZE)  # a joint-mode model is priced as OFA
    assert not joint.decomposed
    per_sample = joint.full_depth_flops(SRC_LEN, NEW_TOKENS + 1, batch_size=2)
    assert 2 * sum(per_sample.values()) == counter.get_total_flops()


def test_deferred_propagation_counts_only_the_layers_a_later_token_reaches():
    model = F.OFAFlopModel(embed_dim=32, ffn_dim=64, heads=4, encoder_layers=LAYERS, decoder_layers=LAYERS,
                           vocab_size=54, resnet_type="resnet18", image_size=IMAGE_SIZE)
    exits = [1, 3, 1, 2, 1]
    # step 0 skips layers 2-3, which step 1 runs; step 2 skips 2-3, of which step 3 runs layer 2;
    # steps 3 and 4 skip layers that no later step reaches
    assert model.decoder_flops(exits, 9)["exit_extras"] == 3 * F.propagate_kv_flops(32)
    step_by_step = replace(model, defer_skipped_kv=False)
    assert step_by_step.decoder_flops(exits, 9)["exit_extras"] == (2 + 0 + 2 + 1 + 2) * F.propagate_kv_flops(32)


# Constant thresholds (beta 1) at which this model's one-sample tokens stop at these layers.
PER_TOKEN_EXITS = {0.8: [3, 2, 2, 2, 2], 0.82: [3, 2, 3, 3, 3]}


@pytest.mark.parametrize("defer", [True, False])
@pytest.mark.parametrize("threshold", sorted(PER_TOKEN_EXITS))
def test_per_token_exits_flops_match_the_counter(dictionary, threshold, defer):
    """One sample, greedy: tokens stop at different layers, and the FLOP model prices the
    propagated keys/values exactly as the decoder makes them, deferred or step by step: at 0.8
    no skipped layer is run again (deferred: never projected), at 0.82 step 1's is."""
    model = build_tiny_mue(dictionary, mue_decoder_threshold=threshold, mue_decoder_beta=1.0, mue_decoder_tau=0.0)
    model.decoder.defer_skipped_kv = defer
    sample = make_sample(1)
    with FlopCounterMode(display=False) as counter:
        hypos = generate(model, dictionary, sample)
    stats = ExitStatistics.for_model(model, image_size=IMAGE_SIZE)
    stats.add_generated(sample, hypos)
    assert hypos[0][0]["exit_layers"].tolist() == PER_TOKEN_EXITS[threshold]
    assert sum(stats.samples[0].flops.values()) == counter.get_total_flops()


# ----------------------------------------------------------------------------- JSON, metrics, plots
def filled_statistics() -> ExitStatistics:
    flop_model = F.OFAFlopModel(embed_dim=32, ffn_dim=64, heads=4, encoder_layers=LAYERS, decoder_layers=LAYERS,
                                vocab_size=54, resnet_type="resnet18", image_size=IMAGE_SIZE, beam=2)
    stats = ExitStatistics(LAYERS, LAYERS, flop_model)
    stats.add_sample(7, 2, 3, torch.tensor([3, 1, 2]), text_length=6, batch_size=2)
    stats.add_sample(8, 0, 1, [2, 2], text_length=6, batch_size=2)  # no image
    stats.add_wall_clock(2.0, 4)
    stats.add_wall_clock(1.0, 1)
    return stats


def test_summary_of_mixed_samples():
    stats = filled_statistics()
    summary = stats.summary()
    assert summary["histograms"] == {"image": [1, 0, 1, 0], "text": [0, 1, 0, 1], "decoder": [0, 1, 3, 1]}
    means = summary["mean_exit_layers"]
    assert means["image"] == 2.0  # over the samples that have an image
    assert means["text"] == 2.0
    assert means["decoder"] == pytest.approx(10 / 5)
    assert means["decoder_per_sample"] == pytest.approx((2.0 + 2.0) / 2)
    reductions = summary["time_reduction_layers"]
    assert reductions["image"] == pytest.approx(1 / 3)  # 2 of 3 layers; the image-less sample has none
    assert reductions["text"] == pytest.approx(1 - 4 / 6)
    assert reductions["decoder_step_weighted"] == pytest.approx(1 - (3 + 2 + 6 + 2 + 4) / (3 * (6 + 3)))
    assert reductions["combined"] == pytest.approx(1 - (2 + 0 + 3 + 1 + 2 + 2) / (3 + 6 + 6))
    assert stats.samples[1].flops["resnet"] == 0 and stats.samples[1].flops["image_stream"] == 0
    merged = ExitStatistics(LAYERS, LAYERS, stats.flop_model)
    merged.extend(stats)
    merged.extend(stats)
    assert merged.histograms()["decoder"] == [0, 2, 6, 2]
    assert merged.flop_summary()["executed"] == pytest.approx(2 * stats.flop_summary()["executed"])
    wall = summary["wall_clock"]
    assert wall["total_seconds"] == 3.0 and wall["num_samples"] == 5
    assert wall["seconds_per_sample"] == pytest.approx(0.6)
    assert wall["median_seconds_per_sample"] == pytest.approx(0.75)


def test_json_round_trip_and_plots(tmp_path):
    stats = filled_statistics()
    path = stats.write_json(tmp_path / "exits" / "caption_test.json")
    loaded = ExitStatistics.read_json(path)
    assert loaded.to_json() == json.loads(path.read_text()) == json.loads(json.dumps(stats.to_json()))
    assert loaded.histograms() == stats.histograms()
    assert loaded.flop_model == stats.flop_model

    written = plot_exit_histograms(path)
    assert set(written) == {"image", "text", "decoder"}
    for stream, png in written.items():
        assert png == tmp_path / "exits" / f"caption_test.{stream}_exits.png"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"format_version": 1, "summary": {"layers": {"encoder": 3, "decoder": 3},
                                                                 "wall_clock": {"batches": []}},
                                "samples": [{"id": 4, "image_layers": 1}]}))
    with pytest.raises(ValueError, match=r"broken\.json.*sample 4.*text_layers"):
        ExitStatistics.read_json(path)


def test_log_to_fairseq_metrics_weights():
    stats = filled_statistics()
    with metrics.aggregate(new_root=True) as agg:
        stats.log_to_fairseq_metrics()
        other = ExitStatistics(LAYERS, LAYERS)
        other.add_sample(9, 1, 1, [1, 1, 1, 1, 1])
        other.log_to_fairseq_metrics()
    values = agg.get_smoothed_values()
    assert values["mue_text_layers"] == pytest.approx((3 + 1 + 1) / 3, abs=1e-3)
    assert values["mue_image_layers"] == pytest.approx((2 + 1) / 2, abs=1e-3)
    assert values["mue_decoder_layers"] == pytest.approx((10 + 5) / 10, abs=1e-3)
    assert values["mue_ms_per_sample"] == pytest.approx(600.0)
    assert values["mue_flop_reduction"] == pytest.approx(stats.flop_summary()["reduction"], abs=1e-4)


def test_bad_input_is_rejected(dictionary):
    stats = ExitStatistics(LAYERS, LAYERS)
    with pytest.raises(ValueError, match="sample 5: decoder exit layers \\[4\\]"):
        stats.add_sample(5, 1, 1, [1, 4])
    with pytest.raises(ValueError, match="sample 5: text exit layer 0"):
        stats.add_sample(5, 1, 0, [1])
    good = {"exit_layers": torch.tensor([1, 2]), "encoder_exit_layers": torch.tensor([1, 1])}
    missing = {"encoder_exit_layers": torch.tensor([1, 1])}
    with pytest.raises(ValueError, match="sample 4: hypothesis has no 'exit_layers'"):
        stats.add_generated(make_sample(2) | {"id": torch.tensor([3, 4])}, [[good], [missing]])
    with_flops = ExitStatistics.for_model(build_tiny_mue(dictionary), image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="needs the source text length"):
        with_flops.add_sample(1, 1, 1, [1])
    assert len(stats) == 0 and len(with_flops) == 0  # nothing of a rejected batch is kept
