"""OFA's caption stage 2 (`scst_reward_criterion`) and encouraging loss
(`adjust_label_smoothed_encouraging_loss`): the reward and loss arithmetic, OFA's two scripts through
`python -m mue_fairseq.cli.train`, updates equal to OFA's own recorded ones, and bad input named.

The recorded updates (tests/fixtures/ofa_{scst,el}_updates.pt) are OFA's own train.py on the tiny
OFA checkpoint and the built-in task, written by tools/ofa_harness/record_scst_fixtures.py in OFA's
environment: the batches of each update, every sampled caption with its CIDEr-D score and reward,
the loss, the gradient norm and the weights after the update. Here the same batches go through
fairseq's trainer with our criteria, built from the same command line.
"""
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

import mue_fairseq  # noqa: F401  (registers the plugin)
from fairseq_logs import log_records
from ofa_fixtures import BPE_DIR, REFERENCE_DIR, require_file
from ofa_stage2_scripts import caption_stage1_el_args, caption_stage2_args

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "mue_fairseq"
FIXTURES = REPO / "tests" / "fixtures"
CHECKPOINT = REFERENCE_DIR / "ofa_tiny_caption.pt"


def recorded(name: str) -> dict:
    return torch.load(require_file(FIXTURES / f"ofa_{name}_updates.pt"), weights_only=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The built-in task as recorded: each stage-2 row has one more reference (see the recorder), and
    the training CIDEr-D pickle is computed from those references."""
    from data_utils.synthetic import build_synthetic_task
    from mue_fairseq.metrics.cider import CIDER_EOS, save_document_frequency

    record = recorded("scst")
    directory = tmp_path_factory.mktemp("stage2_data")
    paths = build_synthetic_task(str(directory), **record["synthetic"])
    stage2 = Path(paths["caption_stage2_train"])
    rows = [line.split("\t") for line in stage2.read_text().splitlines()]
    assert [row[0] for row in rows] == sorted(record["stage2_references"])  # one row per training image
    for row in rows:
        # the built-in references first, then the added one
        assert record["stage2_references"][row[0]].startswith(row[2] + "&&")
        row[2] = record["stage2_references"][row[0]]
    stage2.write_text("".join("\t".join(row) + "\n" for row in rows))
    references = {row[1]: row[2].split("&&") for row in rows}
    save_document_frequency(references, paths["cider_cached_train"], end_word=CIDER_EOS)
    with open(paths["cider_cached_train"], "rb") as f:
        written = pickle.load(f)
    assert written["ref_len"] == record["train_document_frequency"]["ref_len"] == 4.0
    assert dict(written["document_frequency"]) == record["train_document_frequency"]["document_frequency"]
    return directory


def script_args(name: str, data_dir: Path, save_dir: Path) -> List[str]:
    make = {"scst": caption_stage2_args, "el": caption_stage1_el_args}[name]
    require_file(CHECKPOINT)
    require_file(BPE_DIR)
    return make(data_dir, save_dir, CHECKPOINT, BPE_DIR, PLUGIN)


# --------------------------------------------------------------------------- arithmetic
def test_self_critical_reward_is_score_minus_mean_of_the_images_other_samples():
    from mue_fairseq.criterions.scst import self_critical_rewards

    scores = np.array([1.0, 2.0, 3.0, 4.0, 4.0, 1.0])
    # image 1: 1 - (2+3)/2, 2 - (1+3)/2, 3 - (1+2)/2; image 2: 4 - (4+1)/2 twice, 1 - (4+4)/2
    assert self_critical_rewards(scores, 3).tolist() == [-1.5, 0.0, 1.5, 1.5, 1.5, -3.0]
    assert self_critical_rewards(scores, 2).tolist() == [-1.0, 1.0, -1.0, 1.0, 3.0, -3.0]  # pairs: 1-2, 2-1, ...
    with pytest.raises(ValueError, match=">= 2 samples per image"):
        self_critical_rewards(scores, 1)
    with pytest.raises(ValueError, match="not 4 per image"):
        self_critical_rewards(scores, 4)


def test_scst_loss_weights_each_tokens_log_probability_by_its_samples_reward():
    from mue_fairseq.criterions.scst import scst_loss

    lprobs = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]],
                                     [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]]))
    target = torch.tensor([[0, 2], [2, 1]])  # id 1 is padding
    reward = torch.tensor([2.0, -1.0], dtype=torch.float64)
    loss, ntokens = scst_loss(lprobs, target, reward, pad_idx=1)
    assert ntokens == 3 and loss.dtype == torch.float64
    expected = -(math.log(0.5) + math.log(0.8)) * 2.0 + math.log(0.6) * 1.0
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_cider_sentence_drops_punctuation_and_ends_with_eos():
    from mue_fairseq.criterions.scst import cider_sentence

    assert cider_sentence("  a dog, running. ") == "a dog running <eos>"
    assert cider_sentence("") == " <eos>"


def test_encouraging_bonus_is_log_one_minus_p_continued_by_its_tangent():
    from mue_fairseq.criterions.encouraging_loss import encouraging_bonus

    probs = torch.tensor([0.0, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64)
    bonus = encouraging_bonus(probs, 0.75)
    tangent = lambda p: math.log(0.25) - (p - 0.75) / 0.25  # noqa: E731
    assert bonus.tolist() == pytest.approx([0.0, math.log(0.5), math.log(0.25), tangent(0.9), tangent(1.0)])
    assert encouraging_bonus(probs, 1.0)[-1].item() == pytest.approx(math.log(1e-5))  # clamped


# --------------------------------------------------------------------------- OFA's scripts
def run_train_cli(argv: List[str]) -> str:
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    result = subprocess.run([sys.executable, "-m", "mue_fairseq.cli.train", *argv], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mue_fairseq.cli.train failed ({result.returncode}):\n{log[-6000:]}"
    return log


@pytest.mark.parametrize("name, metrics", [("scst", ("loss", "score", "ntokens", "nsentences", "sample_size")),
                                           ("el", ("loss", "nll_loss", "ntokens", "nsentences", "sample_size"))])
def test_ofa_stage2_and_el_scripts_train_validate_and_save(name, metrics, data_dir, tmp_path):
    save_dir = tmp_path / "checkpoints"
    log = run_train_cli(script_args(name, data_dir, save_dir))

    train = log_records(log, "train")
    assert [int(r["num_updates"]) for r in train] == [1, 2], log[-3000:]
    assert all(key in record for record in train for key in metrics), train
    valid = log_records(log, "valid")
    assert len(valid) == 2 and all(math.isfinite(float(record["cider"])) for record in valid), log[-3000:]
    if name == "scst":
        # 2 training batches of 2 images per update, 5 samples each; the rewards are not all 0
        assert all(int(r["nsentences"]) == 20 and float(r["score"]) > 0 for r in train), train
    for file_name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        assert (save_dir / file_name).is_file()
    saved = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["optimizer_history"][-1]["num_updates"] == 2
    assert saved["cfg"]["criterion"]["_name"] == {"scst": "scst_reward_criterion",
                                                  "el": "adjust_label_smoothed_encouraging_loss"}[name]
    restored = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["model"]
    changed = [key for key, value in saved["model"].items()
               if value.is_floating_point() and not torch.equal(value, restored[key])]
    assert any(".layers." in key for key in changed), "two updates changed no layer weight"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", ["scst", "el"])
def test_ofa_stage2_and_el_scripts_on_two_processes_from_an_ofa_checkpoint(name, data_dir, tmp_path):
    """OFA's stage-2 and `_el` scripts as its launcher runs them: two torchrun processes (gloo) restore
    the OFA checkpoint, each trains on its half of the data, rank 0 validates and saves."""
    import os

    save_dir = tmp_path / "checkpoints"
    argv = script_args(name, data_dir, save_dir) + ["--distributed-world-size=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("MUE_CPU_DISTRIBUTED", None)  # cli.train turns CPU DDP on itself
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         "-m", "mue_fairseq.cli.train", *argv],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    # both ranks joined one group of two (torchrun's exit status 0: both ended without error);
    # only rank 0 logs from then on
    assert "initialized host" in log and "as rank 1" in log and "as rank 0" in log, log[-3000:]
    assert "done training" in log, log[-3000:]

    train = log_records(log, "train")
    assert [int(r["num_updates"]) for r in train] == [1, 2], log[-3000:]
    assert all(math.isfinite(float(r["loss"])) for r in train), train
    if name == "scst":
        # the 4 stage-2 images, 2 per process in one batch: 2 x 5 samples per process, 20 per update
        assert all(int(r["nsentences"]) == 20 and float(r["score"]) > 0 for r in train), train
    else:
        # the 8 training captions, 4 per process in one batch of --batch-size 8
        assert all(int(r["nsentences"]) == 8 for r in train), train
    valid = log_records(log, "valid")
    assert len(valid) == 2 and all(math.isfinite(float(r["cider"])) for r in valid), log[-3000:]

    saved = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert saved["optimizer_history"][-1]["num_updates"] == 2
    assert saved["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert saved["cfg"]["criterion"]["_name"] == {"scst": "scst_reward_criterion",
                                                  "el": "adjust_label_smoothed_encouraging_loss"}[name]
    restored = torch.load(CHECKPOINT, map_location="cpu", weights_only=False)["model"]
    assert saved["model"].keys() == restored.keys()
    changed = [key for key, value in saved["model"].items()
               if value.is_floating_point() and not torch.equal(value, restored[key])]
    assert any(".layers." in key for key in changed), "two updates changed no layer weight"


# --------------------------------------------------------------------------- exactness against OFA
def build_trainer(argv: List[str]):
    """fairseq's trainer, model and criterion as `mue_fairseq.cli.train` builds them, restored."""
    from fairseq import checkpoint_utils, tasks
    from fairseq.trainer import Trainer

    from mue_fairseq.cli.train import apply_warmup_ratio, parse_train_args

    args, cfg = parse_train_args(argv)
    apply_warmup_ratio(cfg, args.warmup_ratio)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    trainer = Trainer(cfg, task, model, criterion)
    checkpoint_utils.load_checkpoint(cfg.checkpoint, trainer)
    return trainer, task


def recorded_batch(batch: dict, dataset) -> dict:
    """A recorded batch of OFA's with the images our dataset makes of the same rows (checked against
    OFA's image statistics)."""
    row_of = {str(dataset.dataset[row][0]): row for row in range(len(dataset))}
    rows = [row_of[str(row_id)] for row_id in batch["id"]]
    images = torch.stack([dataset[row]["patch_image"] for row in rows])
    assert list(images.shape) == batch["patch_images_shape"]
    stats = [images.double().sum().item(), (images.double() ** 2).sum().item()]
    assert stats == pytest.approx(batch["patch_images_stats"], rel=1e-9, abs=1e-9)
    net_input = dict(batch["net_input"], patch_images=images)
    return {"id": np.array(batch["id"]), "nsentences": batch["nsentences"], "ntokens": batch["ntokens"],
            "net_input": net_input, "target": batch["target"]}


def replay(trainer, task, updates: List[dict], between=None):
    """Run the recorded updates through `trainer`; what our criterion and trainer saw at each.
    ``between(trainer, task)`` runs between two updates."""
    criterion, seen = trainer.criterion, []
    forward, clip = criterion.forward, trainer.clip_grad_norm

    def observed_forward(model, sample, update_num=0, reduce=True):
        loss, sample_size, logging_output = forward(model, sample, update_num=update_num, reduce=reduce)
        seen[-1]["criterion"].append({"loss": loss.detach().clone(), "sample_size": sample_size,
                                      "logging_output": logging_output, "update_num": update_num,
                                      **getattr(criterion, "_observed", {})})
        return loss, sample_size, logging_output

    def observed_clip(clip_norm):
        norm = clip(clip_norm)
        seen[-1]["grad_norm"] = float(norm)
        return norm

    criterion.forward, trainer.clip_grad_norm = observed_forward, observed_clip
    dataset = task.dataset("train")
    trainer.begin_epoch(1)
    for step, update in enumerate(updates):
        if step and between is not None:
            between(trainer, task)
        seen.append({"criterion": [], "lr": trainer.get_lr(), "num_updates": trainer.get_num_updates()})
        seen[-1]["params_before"] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        trainer.train_step([recorded_batch(batch, dataset) for batch in update["batches"]])
        seen[-1]["params"] = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return seen


def ofa_scst_validation_side_effect(trainer, task):
    """What OFA's validation between two updates does to the weights: its SCST criterion runs the
    teacher-forced pass in training mode also there, so the ResNet's BatchNorm running statistics
    move with the validation batch (ours validates in evaluation mode, see criterions/scst.py).
    The same pass of ours in training mode, over the same validation batch."""
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(len(dataset))])
    criterion = trainer.criterion
    model = trainer.model
    with torch.no_grad():
        model.train()
        tokens, _, _ = criterion.sample_captions(model, sample)
        criterion.sample_lprobs(model, sample, tokens)


def observe_scst_samples(criterion, monkeypatch):
    """Keep the sampled captions, their scores and token log-probabilities of the criterion's last call."""
    from mue_fairseq.criterions import scst

    sample_captions, cider_scores, loss_of_samples = criterion.sample_captions, criterion.cider_scores, scst.scst_loss
    criterion._observed = {}

    def observed_loss(lprobs, target, reward, pad_idx, reduce=True):
        token_lprobs = lprobs.detach().gather(-1, target.unsqueeze(-1)).squeeze(-1)
        criterion._observed["token_lprobs"] = token_lprobs.masked_fill(target.eq(pad_idx), 0.0)
        return loss_of_samples(lprobs, target, reward, pad_idx, reduce=reduce)

    monkeypatch.setattr(scst, "scst_loss", observed_loss)

    def observed_samples(model, sample):
        tokens, hyps, refs = sample_captions(model, sample)
        criterion._observed = {"gen_target": [t.tolist() for t in tokens], "gen_res": hyps, "gt_res": refs}
        return tokens, hyps, refs

    def observed_scores(hyps, refs):
        scores = cider_scores(hyps, refs)
        criterion._observed["scores"] = scores
        return scores

    criterion.sample_captions, criterion.cider_scores = observed_samples, observed_scores


def assert_updates_equal(ours: List[dict], theirs: List[dict], kept: List[str], loss_rtol=1e-5, grad_norm_rtol=1e-5):
    """Learning rate, loss (``loss_rtol`` None: compared by the caller), counts, gradient norm and the
    weights after each update (1e-6) equal the recorded ones."""
    for step, (mine, ofa) in enumerate(zip(ours, theirs)):
        assert mine["num_updates"] == ofa["num_updates"]
        assert mine["lr"] == pytest.approx(ofa["lr"], rel=1e-12, abs=1e-15), step
        assert len(mine["criterion"]) == len(ofa["criterion"])
        for call, (a, b) in enumerate(zip(mine["criterion"], ofa["criterion"])):
            where = f"update {step + 1}, batch {call + 1}"
            assert a["update_num"] == b["update_num"]
            if loss_rtol is not None:
                assert a["loss"].item() == pytest.approx(b["loss"].item(), rel=loss_rtol), where
            assert int(a["sample_size"]) == int(b["sample_size"]), where
            for key in ("ntokens", "nsentences"):
                assert int(a["logging_output"][key]) == int(b["logging_output"][key]), (where, key)
            if "nll_loss" in b["logging_output"]:
                assert float(a["logging_output"]["nll_loss"]) == pytest.approx(
                    float(b["logging_output"]["nll_loss"]), rel=1e-5), where
        assert mine["grad_norm"] == pytest.approx(ofa["grad_norm"], rel=grad_norm_rtol), step
        # Adam moves an element by up to lr whatever the size of its gradient, so an element whose
        # gradient is at rounding level may move differently by a fraction of lr (seen: 2e-6 in one
        # element of a ResNet BatchNorm weight); every other element agrees to 1e-6.
        close = []
        for name, value in ofa["params"].items():
            diff = (mine["params"][name] - value).abs()
            assert diff.max().item() <= 0.3 * ofa["lr"] + 1e-7, (name, step, diff.max().item())
            close.append((diff <= 1e-6 * value.abs() + 1e-7).flatten())
        assert torch.cat(close).float().mean().item() >= 0.99, step
        assert sorted(ofa["param_stats"]) == sorted(mine["params"])
        # Every parameter: the squared norm after the update (1e-6), and that of the update itself
        # (2e-2: Adam's step divides the gradient by its own size, so the steps of parameters whose
        # gradients are at rounding level, the ResNet's BatchNorm ones here, differ by up to 1.1 %).
        for name, (_, squares) in ofa["param_stats"].items():
            value = mine["params"][name].double()
            assert (value * value).sum().item() == pytest.approx(squares, rel=1e-6, abs=1e-12), (name, step)
            delta = value - mine["params_before"][name].double()
            delta_squares = ofa["delta_stats"][name][1]
            assert (delta * delta).sum().item() == pytest.approx(delta_squares, rel=2e-2, abs=1e-16), (name, step)
    assert len(ours) == len(theirs) == 2 and set(kept) <= set(theirs[-1]["params"])


def test_scst_updates_equal_ofas_recorded_updates(data_dir, tmp_path, monkeypatch):
    record = recorded("scst")
    trainer, task = build_trainer(script_args("scst", data_dir, tmp_path) + record["extra_args"])
    observe_scst_samples(trainer.criterion, monkeypatch)
    ours = replay(trainer, task, record["updates"], between=ofa_scst_validation_side_effect)

    from mue_fairseq.criterions.scst import self_critical_rewards

    for step, (mine, ofa) in enumerate(zip(ours, record["updates"])):
        for call, (a, b) in enumerate(zip(mine["criterion"], ofa["criterion"])):
            where = f"update {step + 1}, batch {call + 1}"
            assert a["gen_target"] == b["gen_target"], where  # the same beam samples, token for token
            assert a["gen_res"] == b["gen_res"] and a["gt_res"] == b["gt_res"], where
            assert a["scores"].tolist() == pytest.approx(b["scores"], rel=1e-12, abs=1e-12), where
            rewards = self_critical_rewards(a["scores"], 5)
            assert rewards.tolist() == pytest.approx(b["reward"].tolist(), rel=1e-12, abs=1e-12), where
            assert a["logging_output"]["score"] == pytest.approx(b["logging_output"]["score"], rel=1e-12)
            assert a["loss"].dtype == torch.float64
            # the model's side: the log-probability of every sampled token (float32 rounding apart)
            torch.testing.assert_close(a["token_lprobs"], b["token_lprobs"], rtol=1e-6, atol=1e-6, msg=where)
            # The loss sums reward * log p over the samples of an image, whose rewards sum to 0 (each is
            # the sample's score minus the others' mean) and whose log-probabilities are close: the
            # value cancels to about 1/2000 of its terms' size, and float32 rounding of the terms
            # (1e-7) is 4e-5 of it. So the loss is compared relative to the size of its terms.
            scale = (b["token_lprobs"].double().abs() * b["reward"].abs().unsqueeze(-1)).sum().item()
            assert abs(a["loss"].item() - b["loss"].item()) <= 1e-7 * scale, where
    # The gradient is the same kind of cancelling sum: its norm is compared at 1e-4.
    assert_updates_equal(ours, record["updates"], record["kept_params"], loss_rtol=None, grad_norm_rtol=1e-4)
    # the recorded rewards are not all zero, and the second update moved the weights
    assert any(abs(r) > 0.1 for c in record["updates"][0]["criterion"] for r in c["reward"].tolist())
    assert sum(squares for _, squares in record["updates"][1]["delta_stats"].values()) > 0


def test_encouraging_loss_updates_equal_ofas_recorded_updates(data_dir, tmp_path):
    record = recorded("el")
    trainer, task = build_trainer(script_args("el", data_dir, tmp_path) + record["extra_args"])
    ours = replay(trainer, task, record["updates"])
    assert_updates_equal(ours, record["updates"], record["kept_params"])
    # the second update dropped the worst tokens, int(90 * 0.95) = 85 kept; --drop-best-ratio 0.25 is
    # OFA's option without effect
    assert [int(c["sample_size"]) for u in ours for c in u["criterion"]] == [90, 85]


# --------------------------------------------------------------------------- bad input
def parse_stage2(data_dir: Path, tmp_path: Path, *extra: str):
    from mue_fairseq.cli.train import parse_train_args

    return parse_train_args(script_args("scst", data_dir, tmp_path / "save") + list(extra))


@pytest.mark.parametrize("caption, message", [
    ("", "no references"),
    ("a red square&&&&a blue circle", "reference(s) [2] of 3 empty"),
    ("a red square&&", "reference(s) [2] of 2 empty"),
])
def test_malformed_stage2_row_is_named(caption, message, data_dir, tmp_path):
    from fairseq import tasks

    rows = (data_dir / "caption_stage2_train.tsv").read_text().splitlines()
    bad_row = rows[1].split("\t")
    bad_row[2] = caption
    bad = tmp_path / "bad_stage2.tsv"
    bad.write_text("\n".join([rows[0], "\t".join(bad_row)]) + "\n")
    _, cfg = parse_stage2(data_dir, tmp_path)
    cfg.task.data = f"{bad},{data_dir}/caption_valid.tsv"
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    task.dataset("train")[0]  # the good row
    with pytest.raises(ValueError) as error:
        task.dataset("train")[1]
    assert f"{bad}, line 2 (id {bad_row[1]})" in str(error.value) and message in str(error.value)


WRONG_PICKLES = [
    (pickle.dumps({"df": {}, "ref_len": 4.0}), "missing key 'document_frequency'"),
    (pickle.dumps({"document_frequency": {("a",): 1.0}}), "missing key 'ref_len'"),
    (pickle.dumps([("a",), 1.0]), "missing key 'document_frequency'"),
    (pickle.dumps({"document_frequency": {("a",): 1.0}, "ref_len": 4.0})[:20], "not a CIDEr-D document-frequency "
                                                                                "pickle (pickle data was truncated)"),
]


# The reward's cached tokens are read when the criterion is built, validation's with the model.
CACHED_TOKEN_OPTIONS = {"scst": ("--scst-cider-cached-tokens", "build_criterion", "criterion"),
                        "eval": ("--eval-cider-cached-tokens", "build_model", "model")}


@pytest.mark.parametrize("which, payload, message", [
    *[("scst", payload, message) for payload, message in WRONG_PICKLES],
    *[("eval", payload, message) for payload, message in WRONG_PICKLES[::3]],
], ids=["scst-df", "scst-no_ref_len", "scst-list", "scst-truncated", "eval-df", "eval-truncated"])
def test_cached_tokens_pickle_of_wrong_layout_is_named(which, payload, message, data_dir, tmp_path):
    from fairseq import tasks

    option, build, part = CACHED_TOKEN_OPTIONS[which]
    path = tmp_path / f"coco-{which}-words.p"
    path.write_bytes(payload)
    _, cfg = parse_stage2(data_dir, tmp_path, f"{option}={path}")
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError) as error:
        getattr(task, build)(getattr(cfg, part))
    assert f"{option} {path}" in str(error.value) and message in str(error.value)


@pytest.mark.parametrize("scst_args, message", [
    ("{beam:5}", "--scst-args is not valid JSON: '{beam:5}'"),
    ("[5]", "--scst-args must be a JSON object, got '[5]'"),
])
def test_scst_args_that_are_not_a_json_object_are_named(scst_args, message, data_dir, tmp_path):
    from fairseq import tasks

    _, cfg = parse_stage2(data_dir, tmp_path, f"--scst-args={scst_args}")
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tasks.setup_task(cfg.task)


def test_scst_needs_two_samples_per_image_and_the_scst_generator(data_dir, tmp_path):
    from fairseq import tasks

    _, cfg = parse_stage2(data_dir, tmp_path, '--scst-args={"beam":1,"max_len_b":4}')
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    task.load_dataset("train")
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[0], dataset[1]])
    with pytest.raises(ValueError, match=r"--scst-args .*beam.*: the self-critical baseline needs the same number "
                                         r"\(>= 2\) of sampled captions for every image, got \[1\]"):
        criterion(model, sample)

    _, cfg = parse_stage2(data_dir, tmp_path)
    cfg.task.scst = False
    with pytest.raises(ValueError, match="add --scst"):
        tasks.setup_task(cfg.task).build_criterion(cfg.criterion)


# --------------------------------------------------------------------------- run script
def test_stage2_run_script_trains_on_the_built_in_task(data_dir, tmp_path):
    """run_scripts/caption/train_caption_stage2_mue.sh (torchrun, one CPU process) from the tiny OFA
    checkpoint as MuE's model, with the layer-wise SCST loss and exits validated too."""
    import os
    import shlex

    from ofa_stage2_scripts import TINY_CAPTION_MODEL

    script = REPO / "run_scripts" / "caption" / "train_caption_stage2_mue.sh"
    extra = [*TINY_CAPTION_MODEL, "--max-update=2", "--mue-decoder-threshold=0.9"]
    env = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, NPROC="1", data_dir=str(data_dir),
               data=f"{data_dir}/caption_stage2_train.tsv,{data_dir}/caption_valid.tsv", restore_file=str(CHECKPOINT),
               bpe_dir=str(require_file(BPE_DIR)), patch_image_size="64", save_dir=str(tmp_path / "ckpt"),
               log_dir=str(tmp_path / "logs"), extra_args=" ".join(extra))
    dry = subprocess.run(["bash", str(script)], env={**env, "DRY_RUN": "1"}, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    command = shlex.split(dry.stdout.strip())
    assert command[command.index("mue_fairseq.cli.train") - 1] == "-m"
    for flag in ("--scst", "--criterion=scst_reward_criterion", "--arch=mue_ofa_base", "--warmup-ratio=0.06",
                 "--max-epoch=3", "--batch-size=2", "--update-freq=4", "--selected-cols=1,4,2",
                 f"--scst-cider-cached-tokens={data_dir}/cider_cached_tokens/coco-train-words.p",
                 '--scst-args={"beam":5,"max_len_b":16,"no_repeat_ngram_size":3}'):
        assert flag in command, flag

    result = subprocess.run(["bash", str(script)], env={**env, "criterion": "mue_layerwise_scst"}, capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    train = log_records(log, "train")
    assert [int(r["num_updates"]) for r in train] == [1, 2] and all(float(r["score"]) > 0 for r in train), log[-3000:]
    assert all("loss_layer1" in r and "loss_layer2" in r for r in train), train
    valid = log_records(log, "valid")
    assert len(valid) == 2 and all("cider" in r and "cider_mue" in r for r in valid), valid
    assert list((tmp_path / "ckpt").glob("*/checkpoint_last.pt"))

    missing = subprocess.run(["bash", str(script)], env={**env, "data_dir": str(tmp_path / "none"), "data": "x,y"},
                             capture_output=True, text=True)
    assert missing.returncode != 0
    expected = f"CIDEr-D cached tokens not found: {tmp_path / 'none'}/cider_cached_tokens/coco-train-words.p"
    assert expected in missing.stderr


# --------------------------------------------------------------------------- layer-wise SCST
def layerwise_losses(data_dir: Path, tmp_path: Path, *criteria: List[str]):
    """(loss, gradients, logging output) of each criterion option list on one batch of two images, the
    same model (the tiny OFA checkpoint as MuE's model) and the same samples."""
    from fairseq import checkpoint_utils, tasks

    _, cfg = parse_stage2(data_dir, tmp_path, "--arch=mue_ofa_base")
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    state = checkpoint_utils.load_checkpoint_to_cpu(str(CHECKPOINT))
    model.load_state_dict(state["model"], strict=True)
    task.load_dataset("train")
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[0], dataset[1]])
    results = []
    for options in criteria:
        _, criterion_cfg = parse_stage2(data_dir, tmp_path, "--arch=mue_ofa_base", *options)
        criterion = task.build_criterion(criterion_cfg.criterion)
        model.eval()  # no BatchNorm statistics move between the criteria
        model.zero_grad()
        loss, sample_size, logging_output = criterion(model, sample)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, logging_output, sample_size))
    return results


def assert_grads_close(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rel: float = 1e-5):
    """Each gradient equal up to ``rel`` of its largest entry, with a floor of 1e-7 of the largest entry
    of all: gradients of reward-weighted sums cancel, so small entries carry the rounding of large ones
    (seen: 4e-7 of the largest), and gradients that are 0 in exact arithmetic (a key bias under softmax)
    are rounding noise (1e-10 here, against 25)."""
    assert actual.keys() == expected.keys()
    floor = 1e-7 * max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():
        assert (actual[name] - grad).abs().max().item() <= rel * grad.abs().max().item() + floor, name


def test_layerwise_scst_is_the_weighted_sum_of_each_exits_scst_loss(data_dir, tmp_path):
    ofa, last, first, mean, ofa_prefix, last_prefix, per_caption = layerwise_losses(
        data_dir, tmp_path, [], ["--criterion=mue_layerwise_scst", "--layer-weights=0,1"],
        ["--criterion=mue_layerwise_scst", "--layer-weights=1,0"], ["--criterion=mue_layerwise_scst"],
        ["--ignore-prefix-size=2"], ["--criterion=mue_layerwise_scst", "--layer-weights=0,1", "--ignore-prefix-size=2"],
        ["--criterion=mue_layerwise_scst", "--sentence-avg"])
    assert per_caption[3] == 10 and per_caption[2]["ntokens"] == ofa[3]  # --sentence-avg: 2 images x 5 captions
    # the last exit alone is OFA's criterion: same samples, loss, gradients and logging
    assert last[0].item() == pytest.approx(ofa[0].item(), rel=1e-9, abs=1e-12)
    assert_grads_close(last[1], ofa[1])
    assert last[3] == ofa[3] and last[2]["score"] == ofa[2]["score"] > 0
    assert last[2]["loss_layer2"].item() == pytest.approx(ofa[0].item(), rel=1e-9, abs=1e-12)
    # the first exit's loss differs; the default mean weighs both by 1/2
    assert abs(first[0].item() - last[0].item()) > 1e-3
    assert first[2]["loss_layer1"].item() == pytest.approx(first[0].item(), rel=1e-12)
    assert mean[0].item() == pytest.approx((first[0].item() + last[0].item()) / 2, rel=1e-9, abs=1e-12)
    # --ignore-prefix-size 2 leaves the first two tokens of each of the 10 sampled captions out
    assert ofa_prefix[3] == last_prefix[3] == ofa[3] - 2 * 10
    assert last_prefix[0].item() == pytest.approx(ofa_prefix[0].item(), rel=1e-9, abs=1e-12)
    # and the loss stays: the 5 samples of an image start with the same two tokens, whose log-probabilities
    # are then equal, and the samples' rewards sum to 0
    assert ofa_prefix[0].item() == pytest.approx(ofa[0].item(), rel=1e-9)
    # (with weights 1,0 the last decoder layer gets no gradient)
    halves = {name: (first[1].get(name, torch.zeros_like(grad)) + last[1][name]) / 2 for name, grad in mean[1].items()}
    assert_grads_close(mean[1], halves)


def test_layerwise_scst_samples_with_the_models_exits_when_asked(data_dir, tmp_path):
    """--sample-with-exits: the captions are those the exiting model decodes (here every token stops
    after decoder layer 1 of 2), not the full-depth model's; without an exit enabled it is an error."""
    from fairseq import checkpoint_utils, tasks

    exits = ["--arch=mue_ofa_base", "--criterion=mue_layerwise_scst", "--mue-exit-policy=static",
             "--mue-static-decoder-layers=1"]
    _, cfg = parse_stage2(data_dir, tmp_path, *exits)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    model.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(CHECKPOINT))["model"], strict=True)
    task.load_dataset("train")
    dataset = task.dataset("train")
    sample = dataset.collater([dataset[0], dataset[1]])
    full = task.build_criterion(cfg.criterion)
    _, exiting_cfg = parse_stage2(data_dir, tmp_path, *exits, "--sample-with-exits")
    exiting = task.build_criterion(exiting_cfg.criterion)

    full_tokens, _, _ = full.sample_captions(model, sample)
    exit_tokens, _, _ = exiting.sample_captions(model, sample)
    assert model.mue.mue_static_decoder_layers == 1  # the sampling left the model's exit options as they were
    with torch.no_grad():
        model.eval()
        decoded = task.scst_generator.generate([model], sample)  # the model as it decodes with its exits
    expected = [hypo["tokens"] for hypos in decoded for hypo in hypos]
    assert len(exit_tokens) == len(expected) == 10
    assert all(torch.equal(a, b) for a, b in zip(exit_tokens, expected))
    assert any(a.shape != b.shape or not torch.equal(a, b) for a, b in zip(exit_tokens, full_tokens)), \
        "layer 1 and full depth sampled the same captions: the test cannot tell them apart"
    with torch.no_grad():
        loss, _, logging_output = exiting(model, sample)
    assert math.isfinite(loss.item()) and logging_output["nsentences"] == 10

    _, no_exit_cfg = parse_stage2(data_dir, tmp_path, "--arch=mue_ofa_base", "--criterion=mue_layerwise_scst",
                                  "--sample-with-exits")
    no_exit_model = task.build_model(no_exit_cfg.model)
    with pytest.raises(ValueError, match="--sample-with-exits samples with the model's MuE exits, but none is enabled"):
        task.build_criterion(no_exit_cfg.criterion).sample_captions(no_exit_model, sample)
