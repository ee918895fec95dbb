"""The replay exit policy: generation stops every row where recorded exit statistics say."""
import json

import pytest
import torch

from mue_fairseq.exits.replay import ExitReplay, map_depth
from mue_fairseq.generation.sequence_generator import OFASequenceGenerator
from mue_fairseq.metrics.exit_stats import ExitStatistics
from tiny_models import build_pair, tiny_batch

LAYERS = 3  # tiny_models: 3 + 3 layers
NEW_TOKENS = 4  # min_len = max_len_b: every row decodes 4 tokens + eos, rows keep their places
STEPS = NEW_TOKENS + 1

# Three recorded samples whose streams and tokens stop at different layers; token lists shorter
# than the decoding (cycled) and longer (cut).
RECORDED = [
    (1, 3, [3, 1, 2]),
    (2, 1, [1, 2, 3, 1, 2, 3, 1]),
    (3, 2, [2, 3, 1, 1, 3]),
]


def recorded_statistics(encoder_layers=LAYERS, decoder_layers=LAYERS) -> ExitStatistics:
    stats = ExitStatistics(encoder_layers, decoder_layers)
    for i, (image, text, decoder) in enumerate(RECORDED):
        stats.add_sample(100 + i, image, text, decoder, text_length=6)
    return stats


def generate(model, dictionary, sample, beam):
    generator = OFASequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0, max_len_b=NEW_TOKENS,
                                     min_len=NEW_TOKENS)
    with torch.no_grad():
        return generator.generate([model], sample)


@pytest.mark.parametrize("beam,kv_policy", [(1, "propagate"), (2, "propagate"), (1, "copy"), (2, "none")])
def test_replay_runs_exactly_the_recorded_layers(tmp_path, beam, kv_policy):
    path = recorded_statistics().write_json(tmp_path / "test_exit_stats.json")
    replay = ExitReplay.read_json(path, LAYERS, LAYERS, mapping="equal")
    _, model, dictionary = build_pair()
    model.set_exit_replay(replay, mue_kv_policy=kv_policy)
    batch = 5  # more rows than recorded samples: rows 3 and 4 replay samples 0 and 1 again
    hypos = generate(model, dictionary, tiny_batch(dictionary, batch=batch), beam)
    for row, sample_hypos in enumerate(hypos):
        image, text, decoder = replay.targets(row, STEPS)
        assert RECORDED[row % len(RECORDED)][:2] == (image, text)
        best = sample_hypos[0]
        assert len(best["tokens"]) == STEPS
        assert best["encoder_exit_layers"].tolist() == [image, text]
        assert best["exit_layers"].tolist() == decoder
    # The next batch goes on where this one stopped (position 5 = recorded sample 2).
    hypos = generate(model, dictionary, tiny_batch(dictionary, batch=1, seed=1), beam)
    assert hypos[0][0]["encoder_exit_layers"].tolist() == list(RECORDED[2][:2])


def test_replayed_exits_are_per_row_not_per_batch():
    """Rows of one batch really stop at different layers (the test above would also pass for a
    recording where every sample exits alike)."""
    replay = ExitReplay.from_statistics(recorded_statistics(), LAYERS, LAYERS)
    image, text = replay.start_batch(3, "cpu")
    assert image.tolist() == [1, 2, 3] and text.tolist() == [3, 1, 2]
    assert replay.decoder_layers_at(0, 6, "cpu").tolist() == [3, 3, 1, 1, 2, 2]  # beam 2
    assert replay.decoder_layers_at(4, 6, "cpu").tolist() == [1, 1, 2, 2, 3, 3]  # sample 0 cycles
    with pytest.raises(RuntimeError, match="same length"):
        replay.decoder_layers_at(5, 4, "cpu")  # a generator that dropped a finished sample


def test_proportional_depth_mapping():
    assert [map_depth(v, 6, 3, "proportional") for v in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    assert [map_depth(v, 4, 6, "proportional") for v in range(1, 5)] == [2, 3, 5, 6]
    assert [map_depth(v, 6, 6, "proportional") for v in range(1, 7)] == list(range(1, 7))
    replay = ExitReplay.from_statistics(recorded_statistics(6, 6), 3, 3, mapping="proportional")
    assert replay.image == [1, 1, 2] and replay.text == [2, 1, 1]


def test_equal_mapping_rejects_other_depths():
    with pytest.raises(ValueError, match="3\\+3-layer model, the target has 6\\+6"):
        ExitReplay.from_statistics(recorded_statistics(), 6, 6, mapping="equal", source="x.json")
    _, model, _ = build_pair()
    with pytest.raises(ValueError, match="model has 3\\+3"):
        model.set_exit_replay(ExitReplay.from_statistics(recorded_statistics(), 6, 6))


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format_version=99), "unsupported exit statistics format 99"),
    (lambda d: d.pop("samples"), "'samples'"),
    (lambda d: d["samples"][1].pop("decoder_layers"), "sample 101 lacks key 'decoder_layers'"),
    (lambda d: d["samples"].clear(), "no recorded samples"),
])
def test_stats_file_that_does_not_fit_is_a_clear_error(tmp_path, change, message):
    values = recorded_statistics().to_json()
    change(values)
    path = tmp_path / "bad_exit_stats.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=message) as err:
        ExitReplay.read_json(path, LAYERS, LAYERS)
    assert str(path) in str(err.value)


def test_replay_policy_without_recorded_exits_is_a_clear_error():
    _, model, dictionary = build_pair(mue_exit_policy="replay")
    with pytest.raises(RuntimeError, match="set_exit_replay"):
        generate(model, dictionary, tiny_batch(dictionary, batch=2), beam=1)
