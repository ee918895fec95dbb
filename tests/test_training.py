"""MuE training with fairseq-train: fine-tuning OFA's SNLI-VE fixture with the layer-wise loss, then
evaluation with exits; and a run interrupted after k updates and resumed that ends where an
uninterrupted run ends.

fairseq-train runs in this process (its entry: parse, then `call_main`), on a few synthetic SNLI-VE
rows, with the fixture's own model and task options read from its checkpoint so that the restore is
strict and nothing here repeats the fixture's sizes.
"""
import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List

import pytest
import torch

import mue_fairseq  # noqa: F401  (registers the plugin)
from ofa_fixtures import BPE_DIR, require_fixture

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "mue_fairseq"
# Task options that name files or are set here; every other task option comes from the fixture.
TASK_OPTIONS_SET_HERE = {"_name", "data", "bpe_dir", "bpe"}
MODEL_FILE_OPTIONS = {"resnet_model_path", "encoder_embed_path", "decoder_embed_path"}


@lru_cache(maxsize=None)
def fixture_config(checkpoint: str) -> Dict[str, dict]:
    """The fixture's model and task options as dicts (OFA stores cfg["model"] as a Namespace)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    return {"model": config_dict(state["cfg"]["model"]), "task": config_dict(state["cfg"]["task"])}


def config_dict(values) -> dict:
    return dict(values) if hasattr(values, "items") else dict(vars(values))


def model_option_names() -> Dict[str, bool]:
    """Every OFA model option (file paths excepted) -> whether it is a store_true flag."""
    from mue_fairseq.ofa.model import OFA_MODEL_OPTIONS

    names = {flag[2:].replace("-", "_"): kwargs.get("action") == "store_true" for flag, kwargs, _ in OFA_MODEL_OPTIONS}
    return {name: is_flag for name, is_flag in names.items() if name not in MODEL_FILE_OPTIONS}


def as_flags(values: Dict[str, object], store_true: Dict[str, bool]) -> List[str]:
    """`--name value` per option; booleans as bare flags when true (every such default is false)."""
    argv = []
    for name, value in values.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool) or store_true.get(name, False):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def fixture_options(checkpoint: Path) -> List[str]:
    """The fixture's OFA model options and snli_ve task options as fairseq-train flags."""
    cfg = fixture_config(str(checkpoint))
    store_true = model_option_names()
    model = {name: cfg["model"].get(name) for name in store_true}
    task = {name: value for name, value in cfg["task"].items() if name not in TASK_OPTIONS_SET_HERE}
    return as_flags(model, store_true) + as_flags(task, {})


def synthetic_data(directory: Path, num_train: int, task: str = "snli_ve") -> Dict[str, Path]:
    from data_utils.synthetic import build_synthetic_task

    paths = build_synthetic_task(str(directory), seed=5, num_train=num_train, num_valid=2, num_test=1)
    return {split: Path(paths[f"{task}_{split}"]) for split in ("train", "valid")}


def train(argv: List[str]) -> None:
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.distributed import utils as distributed_utils
    from fairseq_cli.train import main

    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    distributed_utils.call_main(convert_namespace_to_omegaconf(args), main)


def train_args(data: Dict[str, Path], fixture: Path, save_dir: Path, *extra: str, task: str = "snli_ve",
               validate: bool = False) -> List[str]:
    return [
        f"{data['train']},{data['valid']}", "--user-dir", str(PLUGIN), "--task", task, "--bpe-dir", str(BPE_DIR),
        "--arch", "mue_ofa_tiny", *fixture_options(fixture), "--criterion", "mue_layerwise_ce",
        "--ignore-unused-valid-subsets", *([] if validate else ["--disable-validation"]), "--optimizer", "adam",
        "--cpu", "--num-workers", "0", "--seed", "7", "--log-format", "none", "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--save-interval", "1000", *extra,  # saved when --max-update stops it
    ]


def load_as_mue(checkpoint: Path, data: Dict[str, Path]):
    """`checkpoint` as an `mue_ofa` model (exits off) and its task reading `data`."""
    from fairseq import checkpoint_utils

    from mue_fairseq.exits.config import mue_overrides

    overrides = {**mue_overrides(), "bpe_dir": str(BPE_DIR), "data": f"{data['train']},{data['valid']}"}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], arg_overrides=overrides)
    return models[0].eval(), task


def layer_losses(model, task, sample) -> Dict[str, float]:
    """Each decoder layer's loss and nll (per token) on `sample`, model in eval mode."""
    from mue_fairseq.criterions.layerwise_ce import LayerwiseCrossEntropyCriterion

    from mue_fairseq.tasks.exit_validation import full_depth

    criterion = LayerwiseCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    with torch.no_grad(), full_depth(model):  # the trained checkpoint keeps its exit thresholds
        _, _, log = criterion(model, sample)
    layers = len(model.decoder.layers)
    return {
        f"{name}_layer{i}": float(log[f"{name}_layer{i}"]) / float(log[f"sample_size_layer{i}"])
        for i in range(1, layers + 1) for name in ("loss", "nll_loss")
    }


# --------------------------------------------------------------------------- fine-tuning
EXITS = {"--mue-image-threshold": "0.9", "--mue-text-threshold": "0.9", "--mue-decoder-threshold": "0.9"}
# task -> (validation metric, evaluate.py's score of the same thing, its scale, task-specific options)
TASKS = {
    "snli_ve": ("snli_score", "accuracy", 100.0, []),
    "caption": ("cider", "cider_d", 100.0, ["--eval-cider", "--eval-args", '{"beam": 2, "max_len_b": 6}']),
}


@pytest.mark.parametrize("task", ["snli_ve", "caption"])  # SNLI-VE fixture: 1 decoder layer, caption: 2
def test_finetuning_fixture_lowers_every_layer_loss_and_validates_with_exits(task, tmp_path, monkeypatch):
    import fairseq_cli.train

    from mue_fairseq.cli.evaluate import cli_main as evaluate
    from mue_fairseq.models.mue_ofa import MuEOFAModel

    metric, evaluate_metric, scale, task_options = TASKS[task]
    fixture, _ = require_fixture(task)
    data = synthetic_data(tmp_path / "data", num_train=2, task=task)
    num_train = sum(1 for _ in data["train"].open())
    num_valid = sum(1 for _ in data["valid"].open())
    save_dir = tmp_path / "checkpoints"
    updates = 4 if task == "snli_ve" else 8  # captions: longer targets, more to learn
    valid_stats = []
    get_valid_stats = fairseq_cli.train.get_valid_stats
    monkeypatch.setattr(fairseq_cli.train, "get_valid_stats",
                        lambda *args: valid_stats.append(dict(get_valid_stats(*args))) or valid_stats[-1])
    # fairseq keeps the best score on the save function: forget an earlier in-process run's.
    monkeypatch.delattr(fairseq_cli.train.checkpoint_utils.save_checkpoint, "best", raising=False)
    exit_flags = [item for pair in EXITS.items() for item in pair]
    train(train_args(
        data, fixture, save_dir, "--restore-file", str(fixture), "--reset-optimizer", "--reset-dataloader",
        "--reset-meters", "--lr", "5e-3", "--max-update", str(updates), "--batch-size", str(num_train),
        "--batch-size-valid", str(num_valid), "--no-save-optimizer-state", *exit_flags, *task_options,
        "--best-checkpoint-metric", metric, "--maximize-best-checkpoint-metric", task=task, validate=True,
    ))
    trained = save_dir / "checkpoint_last.pt"
    state = torch.load(trained, map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == updates
    assert state["optimizer_history"][-1]["criterion_name"] == "LayerwiseCrossEntropyCriterion"
    saved, own = config_dict(state["cfg"]["model"]), fixture_config(str(fixture))
    assert saved["arch"] == saved["_name"] == "ofa_tiny"  # OFA's name: OFA's own code loads the file
    for name in model_option_names():
        assert saved.get(name) == own["model"].get(name), f"model option {name} differs from the fixture's"
    for name, value in own["task"].items():
        if name not in TASK_OPTIONS_SET_HERE and not name.startswith("eval_"):
            assert state["cfg"]["task"][name] == value, f"task option {name} differs from the fixture's"
    original = torch.load(fixture, map_location="cpu", weights_only=False)["model"]
    assert set(state["model"]) == set(original), "fine-tuning changed the parameter names"
    # Started from the fixture, weights moved; ResNet BatchNorm statistics are kept exactly when the
    # fixture freezes them (--freeze-resnet, the SNLI-VE one) and updated otherwise.
    statistics = [k for k in original if k.endswith("running_mean") and "embed_images" in k]
    kept = [torch.equal(state["model"][k], original[k]) for k in statistics]
    assert statistics and (all(kept) if own["model"].get("freeze_resnet") else not any(kept))
    assert any(not torch.equal(state["model"][k], original[k]) for k in original if original[k].is_floating_point())

    # Every decoder layer's loss on the training rows (all in one batch, dropout off) went down.
    before_model, ofa_task = load_as_mue(fixture, data)
    after_model, _ = load_as_mue(trained, data)
    assert isinstance(before_model, MuEOFAModel) and isinstance(after_model, MuEOFAModel)
    ofa_task.load_dataset("train")
    dataset = ofa_task.dataset("train")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    before, after = layer_losses(before_model, ofa_task, sample), layer_losses(after_model, ofa_task, sample)
    assert len(before) == 2 * len(after_model.decoder.layers)
    # (The caption fixture starts near a uniform prediction, ln 59457 = 11.0 nats per token: 3% is 0.33 nats.)
    required_drop = 0.1 if task == "snli_ve" else 0.03
    for key in before:
        assert after[key] < (1 - required_drop) * before[key], f"{key}: {before[key]:.4f} -> {after[key]:.4f}"

    # Validation ran every epoch (one update each), at full depth and with the configured exits.
    encoder_layers, decoder_layers = len(after_model.encoder.layers), len(after_model.decoder.layers)
    assert len(valid_stats) == updates
    for stats in valid_stats:
        for key in (metric, f"{metric}_mue", "mue_text_layers", "mue_decoder_layers", "mue_layer_reduction",
                    "mue_speedup"):
            assert key in stats, f"validation did not log {key}: {sorted(stats)}"
        assert 1 <= stats["mue_image_layers"] <= encoder_layers and 1 <= stats["mue_text_layers"] <= encoder_layers
        assert 1 <= stats["mue_decoder_layers"] <= decoder_layers
        assert 0 <= stats["mue_layer_reduction"] < 1 and stats["mue_speedup"] > 0
    # checkpoint_best is chosen by the task metric (full depth), as OFA does.
    best = torch.load(save_dir / "checkpoint_best.pt", map_location="cpu", weights_only=False)
    assert best["extra_state"]["val_loss"] == valid_stats[-1][metric]

    # The last validation's numbers are those of evaluating checkpoint_last on the validation file.
    common = [
        str(data["valid"]), "--path", str(trained), "--user-dir", str(PLUGIN), "--task", task,
        "--gen-subset", "valid", "--batch-size", str(num_valid), "--num-workers", "0", "--cpu", "--log-format", "none",
        "--model-overrides", repr({"bpe_dir": str(BPE_DIR)}), "--no-plots", "--beam", "2", "--max-len-b", "6",
    ]
    full = evaluate([*common, "--mue-exit-policy", "static"])
    results = tmp_path / "results"
    exits = evaluate([*common, "--results-path", str(results), *exit_flags])
    assert full.scores[evaluate_metric] == pytest.approx(scale * valid_stats[-1][metric], abs=0.06)
    assert exits.scores[evaluate_metric] == pytest.approx(scale * valid_stats[-1][f"{metric}_mue"], abs=0.06)
    means = exits.exit_summary["mean_exit_layers"]
    for stream in ("image", "text", "decoder"):
        assert means[stream] == pytest.approx(valid_stats[-1][f"mue_{stream}_layers"], abs=1e-3), stream

    # evaluate.py writes the exit statistics of every validation sample.
    assert exits.num_samples == num_valid
    stats = json.loads((results / "valid_exit_stats.json").read_text())
    assert stats["summary"]["layers"] == {"encoder": encoder_layers, "decoder": decoder_layers}
    assert stats["summary"]["num_samples"] == len(stats["samples"]) == num_valid
    for record in stats["samples"]:
        assert 1 <= record["image_layers"] <= encoder_layers and 1 <= record["text_layers"] <= encoder_layers
        assert record["decoder_layers"] and all(1 <= d <= decoder_layers for d in record["decoder_layers"])
    assert exits.exit_summary["mean_exit_layers"] == stats["summary"]["mean_exit_layers"]


# --------------------------------------------------------------------------- resumption
def test_resumed_run_ends_with_the_parameters_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from fairseq.trainer import Trainer

    fixture, _ = require_fixture("snli_ve")
    data = synthetic_data(tmp_path / "data", num_train=3)  # 6 rows: 3 updates per epoch
    k, n = 2, 5  # interrupted mid-epoch; the resumed part crosses an epoch boundary
    # --finetune-from-model starts from the fixture only when the save dir has no checkpoint_last.pt;
    # the fixture's dropout and drop-path stay on (fairseq seeds them by update number).
    common = ["--finetune-from-model", str(fixture), "--lr", "1e-3", "--batch-size", "2"]
    steps = []
    train_step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, *a, **kw: steps.append(1) or train_step(self, *a, **kw))

    train(train_args(data, fixture, tmp_path / "resumed", *common, "--max-update", str(k)))
    assert torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu",
                      weights_only=False)["optimizer_history"][-1]["num_updates"] == k
    steps.clear()
    train(train_args(data, fixture, tmp_path / "resumed", *common, "--max-update", str(n)))
    assert len(steps) == n - k, "the second run did not resume from checkpoint_last.pt"
    train(train_args(data, fixture, tmp_path / "straight", *common, "--max-update", str(n)))

    resumed = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    straight = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert resumed["optimizer_history"][-1]["num_updates"] == straight["optimizer_history"][-1]["num_updates"] == n
    assert resumed["model"].keys() == straight["model"].keys()
    original = torch.load(fixture, map_location="cpu", weights_only=False)["model"]
    moved = 0
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)  # bit-identical
        moved += int(tensor.is_floating_point() and not torch.equal(tensor, original[name]))
    assert moved > 0, "training did not change any parameter"
