"""Backbone pre-training on the synthetic scenes, and loading its weights with --resnet-model-path."""
import json
from pathlib import Path

import pytest
import torch

from data_utils.synthetic import SyntheticTaskConfig, build_synthetic_task
from mue_fairseq.metrics.synthetic_content import load_meta
from mue_fairseq.cli.pretrain_backbone import CELL_CLASSES, build_parser, cell_targets, load_scenes, pretrain
from mue_fairseq.ofa.checkpoint import load_ofa_ensemble
from mue_fairseq.ofa.model import OFAModel

from tiny_models import TinyTask, tiny_args, tiny_dictionary


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes")
    build_synthetic_task(str(out), seed=3, num_train=12, num_valid=4, num_test=1,
                         config=SyntheticTaskConfig(image_size=48, captions_per_image=2))
    return out


def test_cell_targets_put_each_object_class_in_its_grid_cell():
    record = {"image_id": 7, "objects": ["large red circle r0c2", "small hollow star r2c1"]}
    cells = cell_targets(record, "x.meta.jsonl")
    assert CELL_CLASSES[cells[2]] == "large red circle"
    assert CELL_CLASSES[cells[7]] == "small hollow star"
    assert [c for i, c in enumerate(cells) if i not in (2, 7)] == [0] * 7


def test_cell_targets_name_the_file_and_image_of_an_unreadable_object():
    with pytest.raises(ValueError, match=r"x\.meta\.jsonl: image 7: cannot read object 'large pink circle r0c2'"):
        cell_targets({"image_id": 7, "objects": ["large pink circle r0c2"]}, "x.meta.jsonl")


def test_load_scenes_reads_each_image_once_with_its_scene_record(scenes):
    images, targets = load_scenes(str(scenes / "caption_train.tsv"), patch_image_size=32)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.uint8
    meta = load_meta(str(scenes / "caption_train.meta.jsonl"))
    first_of_image = {}
    for record in sorted(meta.values(), key=lambda r: r["uniq_id"]):
        first_of_image.setdefault(record["image_id"], record)
    expected = [cell_targets(record, "") for record in first_of_image.values()]
    assert targets.tolist() == expected
    assert all(sum(c != 0 for c in row) == len(r["objects"]) for row, r in zip(targets.tolist(), first_of_image.values()))


def test_load_scenes_needs_the_meta_file_beside_the_tsv(tmp_path, scenes):
    tsv = tmp_path / "caption_train.tsv"
    tsv.write_text((scenes / "caption_train.tsv").read_text())
    with pytest.raises(FileNotFoundError, match="caption_train.meta.jsonl"):
        load_scenes(str(tsv), 32)


def test_load_scenes_names_the_line_of_a_corrupt_row(tmp_path, scenes):
    lines = (scenes / "caption_train.tsv").read_text().splitlines(keepends=True)
    (tmp_path / "caption_train.tsv").write_text(lines[0] + "x\t" + lines[1].split("\t", 1)[1])
    (tmp_path / "caption_train.meta.jsonl").write_text((scenes / "caption_train.meta.jsonl").read_text())
    with pytest.raises(ValueError, match=r"caption_train.tsv:2: uniq-id 'x' is not a number"):
        load_scenes(str(tmp_path / "caption_train.tsv"), 32)
    (tmp_path / "caption_train.tsv").write_text(lines[0] + "one column only\n")
    with pytest.raises(ValueError, match=r"caption_train.tsv:2: expected 5 caption columns, got 1"):
        load_scenes(str(tmp_path / "caption_train.tsv"), 32)
    not_an_image = lines[2].rsplit("\t", 1)[0] + "\taGVsbG8=\n"  # a new image (rows 1-2 share one); "hello"
    (tmp_path / "caption_train.tsv").write_text(lines[0] + not_an_image)
    with pytest.raises(ValueError, match=r"caption_train.tsv:2: image column"):
        load_scenes(str(tmp_path / "caption_train.tsv"), 32)


def test_pretraining_learns_the_cells_and_its_weights_initialise_an_ofa_resnet(scenes, tmp_path):
    weights = tmp_path / "resnet.pt"
    args = build_parser().parse_args([
        "--data", str(scenes / "caption_train.tsv"), "--valid-data", str(scenes / "caption_train.tsv"),
        "--out", str(weights), "--steps", "60", "--batch-size", "12", "--patch-image-size", "32",
        "--lr", "2e-3", "--no-flip", "--log-interval", "30",
    ])
    result = pretrain(args)
    # Scored on the training scenes themselves: 60 steps must fit 12 scenes far beyond the
    # empty-cell rate (about 70% of cells are empty), i.e. the objects are recognised.
    assert result["object_accuracy"] > 60.0
    assert json.loads(weights.with_suffix(".json").read_text())["object_accuracy"] == result["object_accuracy"]

    saved = torch.load(weights)
    model = OFAModel.build_model(tiny_args("ofa_tiny", resnet_model_path=str(weights)), TinyTask(tiny_dictionary()))
    loaded = model.encoder.embed_images.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[key], loaded[key]) for key in saved)


def test_resnet_model_path_errors_name_the_file(tmp_path):
    task = TinyTask(tiny_dictionary())
    with pytest.raises(FileNotFoundError, match="--resnet-model-path .*missing.pt: no such file"):
        OFAModel.build_model(tiny_args("ofa_tiny", resnet_model_path=str(tmp_path / "missing.pt")), task)
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="wrong.pt: not weights of this --resnet-type"):
        OFAModel.build_model(tiny_args("ofa_tiny", resnet_model_path=str(wrong)), task)


@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_fine_tuning_starts_from_the_resnet_file_and_its_checkpoint_loads_without_it(scenes, tmp_path, frozen):
    """fairseq-train with --resnet-model-path: the ResNet starts from the file (and stays exactly so with
    --freeze-resnet-weights); the checkpoint keeps the option in its config, yet evaluation must load it
    after the file is gone (the weights are inside)."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli import train

    from mue_fairseq.ofa.resnet import build_resnet

    from ofa_fixtures import require_file
    from tiny_checkpoint import BPE_DIR, TASK_ARGS, TINY_MODEL_ARGS, _plugin_dir

    require_file(BPE_DIR)
    resnet = build_resnet("resnet18", False, 0.0)
    torch.nn.init.constant_(resnet.conv1.weight, 0.5)  # recognisable after two small updates
    weights = tmp_path / "resnet.pt"
    torch.save(resnet.state_dict(), weights)
    save_dir = tmp_path / "checkpoints"
    argv = [
        f"{scenes / 'caption_train.tsv'},{scenes / 'caption_valid.tsv'}", "--user-dir", str(_plugin_dir()),
        "--task", "caption", "--bpe-dir", str(BPE_DIR), *TASK_ARGS["caption"], *TINY_MODEL_ARGS,
        "--resnet-model-path", str(weights), "--ignore-unused-valid-subsets",
        "--criterion", "adjust_label_smoothed_cross_entropy", "--optimizer", "adam", "--lr", "1e-4",
        "--max-update", "2", "--batch-size", "4", "--cpu", "--num-workers", "0", "--log-format", "none",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--disable-validation", "--seed", "1",
    ] + (["--freeze-resnet", "--freeze-resnet-weights"] if frozen else [])
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), train.main)
    checkpoint = save_dir / "checkpoint_last.pt"
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    trained = state["model"]["encoder.embed_images.conv1.weight"]
    assert (trained - 0.5).abs().max() < 0.01  # started from the file (Kaiming init is nowhere near 0.5)
    resnet_unchanged = all(torch.equal(state["model"][f"encoder.embed_images.{key}"], value)
                           for key, value in torch.load(weights).items() if not key.endswith("num_batches_tracked"))
    assert resnet_unchanged == frozen
    assert state["cfg"]["model"].resnet_model_path == str(weights)

    weights.unlink()
    models, _, _ = load_ofa_ensemble([str(checkpoint)])
    assert torch.equal(models[0].encoder.embed_images.conv1.weight, trained)


def test_quickstart_pretrains_once_and_trains_a_backbone_recipe_in_its_own_folder(scenes, tmp_path, monkeypatch):
    from mue_fairseq.cli import quickstart

    assert quickstart.pretrain_backbone(tmp_path, scenes, 0) == []
    calls = []
    import mue_fairseq.cli.pretrain_backbone as module

    monkeypatch.setattr(module, "pretrain", lambda args: calls.append(args) or torch.save({}, args.out))
    first = quickstart.pretrain_backbone(tmp_path, scenes, 5)
    again = quickstart.pretrain_backbone(tmp_path, scenes, 5)
    assert first == again
    assert first[:2] == ["--resnet-model-path", str(tmp_path / "backbone_resnet_5_steps.pt")]
    assert len(calls) == 1 and calls[0].steps == 5 and calls[0].patch_image_size == 64

    commands = []

    def fake_fairseq_train(command, check):
        commands.append(command)
        (Path(command[command.index("--save-dir") + 1])).mkdir(parents=True)

    monkeypatch.setattr(quickstart.subprocess, "run", fake_fairseq_train)
    plain = quickstart.train("caption", scenes, tmp_path / "checkpoints_caption", 3, 4, "bpe")
    backbone = quickstart.train("caption", scenes, tmp_path / "checkpoints_caption", 3, 4, "bpe", first)
    assert plain.parent != backbone.parent  # fairseq would otherwise resume the plain run's checkpoint
    assert first[-2:] == ["--freeze-resnet", "--freeze-resnet-weights"]  # the backbone stays as pre-trained
    assert commands[1][-len(first):] == first and "--resnet-model-path" not in commands[0]
    assert commands[1][commands[1].index("--save-dir") + 1] == str(backbone.parent)
