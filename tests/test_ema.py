"""fairseq's EMA on OFA models (`mue_fairseq.ema`) and evaluation of the stored EMA weights (`--ema-eval`)."""
import pytest
import torch
from fairseq.dataclass.configs import EMAConfig

import mue_fairseq  # noqa: F401  (registers the plugin and the EMA fix)
from mue_fairseq import ema
from tiny_checkpoint import tiny_checkpoint
from tiny_models import build_pair

torch.set_num_threads(1)
EMA_TRAINING = ["--disable-validation", "--store-ema", "--ema-fp32", "--ema-decay", "0.5"]


def test_trainer_builds_the_ema_that_copies_integer_entries():
    from fairseq import trainer

    assert trainer.build_ema is ema.build_ema
    ema.install()  # a second call changes nothing
    assert trainer.build_ema is ema.build_ema
    try:
        ema.uninstall()
        assert trainer.build_ema.__module__ == "fairseq.models.ema"
    finally:
        ema.install()
    assert trainer.build_ema is ema.build_ema


@pytest.mark.parametrize("fp32", [True, False])
def test_ema_step_averages_floats_and_copies_integer_entries(fp32):
    _, model, _ = build_pair()
    integer_keys = ema.integer_state_keys(model)
    # what an OFA model holds: BatchNorm counters and the relative-position tables
    assert any(k.endswith("num_batches_tracked") for k in integer_keys)
    assert any(k.endswith("token_rp_bucket") for k in integer_keys)
    averaged = ema.build_ema(model, EMAConfig(store_ema=True, ema_decay=0.25, ema_fp32=fp32), None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Shared weights (embeddings and output projection) appear under several keys, and fairseq's EMA
    # averages each alias in turn (its own behaviour, not what is tested here): only unshared ones checked.
    pointers = [v.data_ptr() for v in model.state_dict().values()]
    shared = {k for k, v in model.state_dict().items() if pointers.count(v.data_ptr()) > 1}
    seen = set()
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.data_ptr() in seen:
                continue
            seen.add(value.data_ptr())
            if key.endswith("num_batches_tracked"):  # the integer entries training changes
                value.add_(3)
            elif value.is_floating_point():
                value.add_(1.0)
    averaged.step(model)  # fairseq-fixed's own EMA raises here on the integer entries
    assert shared and len(shared) < len(before) / 4
    after = averaged.get_model().state_dict()
    for key, value in model.state_dict().items():
        if key in integer_keys:
            assert after[key].dtype == value.dtype
            assert torch.equal(after[key], value), key
        elif value.is_floating_point() and "version" not in key and key not in shared:
            # 0.25 * old + 0.75 * (old + 1): one float32 rounding of each term
            expected = before[key] + 0.75
            assert torch.allclose(after[key], expected, rtol=0, atol=4 * torch.finfo(torch.float32).eps
                                  * (expected.abs() + 1).max().item()), key


@pytest.fixture(scope="module")
def ema_checkpoint(tmp_path_factory):
    """vqa_gen trained two updates by fairseq-train with --store-ema (failed before the fix)."""
    return tiny_checkpoint("vqa_gen", tmp_path_factory, EMA_TRAINING)


def _load(checkpoint, extra=()):
    from mue_fairseq.cli.evaluate import load_for_evaluation, parse_evaluation_args

    return load_for_evaluation(parse_evaluation_args(checkpoint.eval_args() + list(extra)))


def test_store_ema_training_writes_the_ema_weights(ema_checkpoint):
    state = torch.load(ema_checkpoint.checkpoint, map_location="cpu", weights_only=False)
    stored = state["extra_state"]["ema"]
    assert set(stored) == set(state["model"])
    floats = [k for k, v in state["model"].items() if v.is_floating_point() and "version" not in k]
    # decay 0.5 over two updates: the average lags behind the trained weights
    assert any(not torch.equal(stored[k].float(), state["model"][k].float()) for k in floats)
    for key, value in state["model"].items():
        if not value.is_floating_point():
            assert torch.equal(stored[key], value), key


def test_ema_eval_evaluates_the_stored_ema_weights(ema_checkpoint):
    stored = torch.load(ema_checkpoint.checkpoint, map_location="cpu", weights_only=False)["extra_state"]["ema"]
    plain, _, _ = _load(ema_checkpoint)
    averaged, task, cfg = _load(ema_checkpoint, ["--ema-eval"])
    for key, value in averaged[0].state_dict().items():
        assert torch.equal(value, stored[key].to(value.dtype)), key
    assert any(not torch.equal(value, averaged[0].state_dict()[key])
               for key, value in plain[0].state_dict().items() if value.is_floating_point())
    from mue_fairseq.cli.evaluate import run_evaluation

    result, _ = run_evaluation(averaged, task, cfg, subset="valid", progress=False)
    assert result.num_samples == 12  # 6 validation images, 2 questions each


def test_ema_eval_without_ema_weights_is_a_clear_error(tmp_path_factory):
    checkpoint = tiny_checkpoint("vqa_gen", tmp_path_factory)
    with pytest.raises(ValueError, match=r"--ema-eval: the checkpoint .*checkpoint_last\.pt stores no EMA weights"):
        _load(checkpoint, ["--ema-eval"])


def test_other_models_get_fairseqs_own_ema():
    """Only our OFA models' integer entries are skipped: a plugin import changes no one else's EMA."""

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("steps", torch.zeros(1, dtype=torch.long))

    averaged = ema.build_ema(Other(), EMAConfig(store_ema=True, ema_decay=0.5), None)
    assert not averaged.skip_keys
    _, model, _ = build_pair()
    assert ema.build_ema(model, EMAConfig(store_ema=True, ema_decay=0.5), None).skip_keys == ema.integer_state_keys(model)
