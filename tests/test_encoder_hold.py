"""--freeze-encoder-layers-updates: the encoder layers stay as initialised for the first N updates."""
from pathlib import Path

import pytest
import torch

from data_utils.synthetic import SyntheticTaskConfig, build_synthetic_task
from mue_fairseq.ofa.model import OFAModel

from tiny_models import TinyTask, tiny_args, tiny_dictionary


def _encoder_layers(state):
    return {k: v for k, v in state["model"].items() if k.startswith("encoder.layers.")}


def test_fairseq_train_holds_the_encoder_layers_for_the_window_then_trains_them(tmp_path):
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    from ofa_fixtures import require_file
    from tiny_checkpoint import BPE_DIR, TASK_ARGS, TINY_MODEL_ARGS, _plugin_dir

    require_file(BPE_DIR)
    build_synthetic_task(str(tmp_path / "data"), seed=3, num_train=8, num_valid=2, num_test=1,
                         config=SyntheticTaskConfig(image_size=48))
    data = tmp_path / "data"
    save_dir = tmp_path / "checkpoints"
    argv = [
        f"{data / 'caption_train.tsv'},{data / 'caption_valid.tsv'}", "--user-dir", str(_plugin_dir()),
        "--task", "caption", "--bpe-dir", str(BPE_DIR), *TASK_ARGS["caption"], *TINY_MODEL_ARGS,
        "--freeze-encoder-layers-updates", "2", "--ignore-unused-valid-subsets",
        "--criterion", "adjust_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-3",
        "--weight-decay", "0.01", "--max-update", "3", "--batch-size", "4", "--cpu", "--num-workers", "0",
        "--log-format", "none", "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation",
        "--save-interval-updates", "1", "--keep-interval-updates", "-1", "--seed", "1",
    ]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)
    states = [checkpoint_utils.load_checkpoint_to_cpu(str(save_dir / f"checkpoint_1_{n}.pt")) for n in (1, 2, 3)]
    held = [_encoder_layers(state) for state in states]
    # Updates 1 and 2 fall in the window: not even weight decay touches the layers.
    assert all(torch.equal(held[0][key], held[1][key]) for key in held[0])
    # Update 3 trains them ...
    assert any(not torch.equal(held[1][key], held[2][key]) for key in held[1])
    # ... while the rest of the model trained all along.
    decoder_key = "decoder.layers.0.fc1.weight"
    assert not torch.equal(states[0]["model"][decoder_key], states[1]["model"][decoder_key])
    projection = "encoder.image_proj.weight"
    assert not torch.equal(states[0]["model"][projection], states[1]["model"][projection])


def test_the_window_switches_the_encoder_layers_gradients_at_forward_time():
    task = TinyTask(tiny_dictionary())
    model = OFAModel.build_model(tiny_args("ofa_tiny", freeze_encoder_layers_updates=2), task)
    # Built with gradients on: fairseq's optimizer must hold the layers for when the window ends.
    assert all(p.requires_grad for p in model.encoder.layers.parameters())
    model.train()
    for updates, trained in ((0, False), (1, False), (2, True)):
        model.set_num_updates(updates)
        model.hold_encoder_layers()
        assert all(p.requires_grad == trained for p in model.encoder.layers.parameters())
        assert all(p.requires_grad for p in model.decoder.parameters())


@pytest.mark.parametrize("overrides, message", [
    ({"freeze_encoder_layers_updates": -1}, "must be >= 0, got -1"),
    ({"freeze_encoder_layers_updates": 5, "distributed_world_size": 2}, "needs --find-unused-parameters"),
    ({"freeze_encoder_layers_updates": 5, "fp16": True}, "does not work with --fp16"),
    ({"freeze_encoder_layers_updates": 5, "memory_efficient_bf16": True}, "does not work with --memory-efficient-bf16"),
])
def test_bad_window_settings_are_refused_with_the_option_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        OFAModel.build_model(tiny_args("ofa_tiny", **overrides), TinyTask(tiny_dictionary()))


def test_grounding_curves_writes_a_curve_per_recipe(tmp_path):
    import json
    import sys

    from mue_fairseq.ofa.resnet import build_resnet

    from ofa_fixtures import require_file
    from tiny_checkpoint import BPE_DIR

    require_file(BPE_DIR)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import grounding_curves

    build_synthetic_task(str(tmp_path / "data"), seed=3, num_train=6, num_valid=2, num_test=1,
                         config=SyntheticTaskConfig(image_size=48))
    resnet = tmp_path / "resnet.pt"
    torch.save(build_resnet("resnet18", False, 0.0).state_dict(), resnet)
    common = ["--data", str(tmp_path / "data"), "--resnet", str(resnet), "--bpe-dir", str(BPE_DIR),
              "--steps", "2", "--batch-size", "2", "--every", "1", "--out", str(tmp_path / "curves")]
    with pytest.raises(SystemExit):
        grounding_curves.main(common + ["--recipes", "ofa,bigger"])
    grounding_curves.main(common + ["--recipes", "no_picture,encoder_held"])
    result = json.loads((tmp_path / "curves.json").read_text())
    assert list(result["curves"]) == ["no_picture", "encoder_held"]
    assert all(len(curve) == 2 and all(0 < loss < 20 for loss in curve) for curve in result["curves"].values())
    assert (tmp_path / "curves.png").stat().st_size > 0
