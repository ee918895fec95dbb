"""Tasks `caption` and `snli_ve`: options, OFA checkpoints, batching, generation and validation."""
import argparse
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ofa_fixtures import BPE_DIR, fixture_paths, load_fixture_model, load_reference, require_file, require_fixture
from ofa_tsv_rows import caption_fixture_rows, snli_fixture_rows, solid_image_base64, write_tsv

import mue_fairseq  # noqa: F401
import mue_fairseq.tasks  # noqa: F401  (registers caption and snli_ve)
from fairseq import metrics, options
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.dataclass.utils import convert_namespace_to_omegaconf, merge_with_parent
from mue_fairseq.tasks.caption import CaptionConfig, CaptionTask
from mue_fairseq.tasks.ofa_task import contiguous_batches
from mue_fairseq.tasks.snli_ve import SnliVeConfig, SnliVeTask
from mue_fairseq.tasks.snli_ve_scoring import answer_constraint_masks, build_candidate_batch

def require_bpe_dir() -> str:
    return str(require_file(BPE_DIR))  # missing: the test fails, naming it


def make_task(task_cls, config_cls, **overrides):
    cfg = OmegaConf.structured(config_cls(bpe_dir=require_bpe_dir(), **overrides))
    return task_cls.setup_task(cfg)


def parse_cli(argv):
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    return convert_namespace_to_omegaconf(args)


def snli_rows(n):
    labels = ["entailment", "contradiction", "neutral"]
    image = solid_image_base64()
    return [[str(i), f"img{i}", image, f"hypothesis {i}", f"premise {i}", labels[i % 3]] for i in range(n)]


# --------------------------------------------------------------------------- options
def test_cli_accepts_ofa_options_and_data_is_positional():
    bpe_dir = require_bpe_dir()
    cfg = parse_cli([
        "train.tsv,valid.tsv", "--task", "snli_ve", "--arch", "ofa_tiny", "--bpe-dir", bpe_dir,
        "--selected-cols", "0,2,3,4,5", "--add-caption", "--prompt-type", "prev_output", "--valid-batch-size", "7",
        "--max-src-length", "80", "--max-tgt-length", "20", "--patch-image-size", "288",
        "--orig-patch-image-size", "256", "--imagenet-default-mean-and-std", "--code-dict-size", "8192",
        "--num-bins", "1000", "--ans2label-dict", '{"no": 0, "yes": 1, "maybe": 2}', "--batch-size", "4",
    ])
    assert cfg.task._name == "snli_ve" and cfg.task.data == "train.tsv,valid.tsv"
    assert (cfg.task.prompt_type, cfg.task.valid_batch_size, cfg.task.patch_image_size) == ("prev_output", 7, 288)
    assert cfg.task.add_caption and cfg.task.imagenet_default_mean_and_std
    cfg = parse_cli([
        "t.tsv,v.tsv", "--task", "caption", "--arch", "ofa_tiny", "--bpe-dir", bpe_dir, "--eval-cider",
        "--eval-bleu", "--eval-args", '{"beam": 5, "max_len_b": 16}', "--eval-print-samples",
        "--eval-cider-cached-tokens", "coco-valid-words.p", "--scst", "--scst-args", '{"beam": 5}', "--batch-size", "4",
    ])
    assert cfg.task._name == "caption" and cfg.task.eval_cider and cfg.task.scst
    assert cfg.task.eval_cider_cached_tokens == "coco-valid-words.p"


@pytest.mark.parametrize("name,config_cls", [("caption", CaptionConfig), ("snli_ve", SnliVeConfig)])
def test_every_ofa_checkpoint_task_key_is_accepted(name, config_cls):
    checkpoint, _ = require_fixture(name)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    task_cfg = state["cfg"]["task"]
    assert set(task_cfg) - {"_name"} <= set(config_cls.__dataclass_fields__)
    merged = merge_with_parent(config_cls(), OmegaConf.create(task_cfg), remove_missing=False)
    assert merged.selected_cols == task_cfg["selected_cols"]


def test_missing_bpe_dir_is_a_clear_error(tmp_path):
    cfg = OmegaConf.structured(SnliVeConfig(bpe_dir=str(tmp_path / "no_bpe")))
    with pytest.raises(FileNotFoundError, match=r"--bpe-dir .*no_bpe does not exist"):
        SnliVeTask.setup_task(cfg)
    if all(path.exists() for path in fixture_paths("snli_ve")):
        with pytest.raises(FileNotFoundError, match=r"--bpe-dir .*no_bpe does not exist"):
            load_fixture_model("snli_ve", {"bpe_dir": str(tmp_path / "no_bpe")})


def test_bad_option_values_are_rejected():
    with pytest.raises(ValueError, match="--prompt-type must be one of"):
        make_task(SnliVeTask, SnliVeConfig, prompt_type="question")
    with pytest.raises(ValueError, match="--ans2label-dict is not valid JSON"):
        make_task(SnliVeTask, SnliVeConfig, ans2label_dict="{no: 0}")
    with pytest.raises(ValueError, match="--eval-args is not valid JSON"):
        make_task(CaptionTask, CaptionConfig, eval_args="{beam: 5}")
    with pytest.raises(ValueError, match="--left-pad-source not supported"):
        make_task(CaptionTask, CaptionConfig, left_pad_source=True)


def test_ans2label_file_sets_answer_order(tmp_path):
    path = tmp_path / "ans2label.json"
    path.write_text('{"yes": 0, "no": 1}')
    task = make_task(SnliVeTask, SnliVeConfig, ans2label_file=str(path))
    assert task.index2ans == {0: "yes", 1: "no"}
    assert [t.tolist() for t in task.answer_tokens] == [[4420], [117]]
    assert task.constraint_trie.next_tokens([]) == [4420, 117]
    with pytest.raises(FileNotFoundError, match="--ans2label-file .*missing.json does not exist"):
        make_task(SnliVeTask, SnliVeConfig, ans2label_file=str(tmp_path / "missing.json"))


# ------------------------------------------------------------------- data files
def test_train_files_rotate_by_epoch_and_last_file_is_validation(tmp_path):
    task = make_task(SnliVeTask, SnliVeConfig, data="a.tsv,b.tsv,valid.tsv")
    assert [task.data_path("train", epoch) for epoch in (1, 2, 3)] == ["a.tsv", "b.tsv", "a.tsv"]
    assert task.data_path("valid") == task.data_path("test") == "valid.tsv"
    assert task.has_sharded_data("train") and not task.has_sharded_data("valid")
    single = make_task(SnliVeTask, SnliVeConfig, data="only.tsv")
    assert single.data_path("valid") == "only.tsv" and not single.has_sharded_data("train")
    with pytest.raises(ValueError, match="training needs the training file"):
        single.data_path("train")


def test_load_dataset_reads_the_split_file(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", snli_rows(4))
    valid = write_tsv(tmp_path / "valid.tsv", snli_rows(2))
    task = make_task(SnliVeTask, SnliVeConfig, data=f"{train},{valid}", selected_cols="0,2,3,4,5", patch_image_size=8)
    task.load_dataset("train")
    task.load_dataset("valid")
    assert len(task.dataset("train")) == 4 and len(task.dataset("valid")) == 2
    assert task.dataset("train").split == "train"
    assert task.dataset("valid")[1]["constraint_mask"].any()


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_validation_keeps_every_sample(tmp_path, num_shards):
    valid = write_tsv(tmp_path / "valid.tsv", snli_rows(20))
    task = make_task(SnliVeTask, SnliVeConfig, data=f"{valid},{valid}", selected_cols="0,2,3,4,5", patch_image_size=8)
    task.load_dataset("valid")
    seen = []
    for shard_id in range(num_shards):
        iterator = task.get_batch_iterator(
            task.dataset("valid"), max_sentences=8, required_batch_size_multiple=8,
            num_shards=num_shards, shard_id=shard_id, skip_remainder_batch=True,
        ).next_epoch_itr(shuffle=False)
        for batch in iterator:
            if batch:
                assert batch["nsentences"] <= 8
                seen.extend(int(i) for i in batch["id"])
    assert sorted(seen) == list(range(20))


def test_training_batches_cover_the_file_and_need_batch_size(tmp_path):
    assert contiguous_batches(5, 2) == [[0, 1], [2, 3], [4]]
    train = write_tsv(tmp_path / "train.tsv", snli_rows(5))
    task = make_task(SnliVeTask, SnliVeConfig, data=f"{train},{train}", selected_cols="0,2,3,4,5", patch_image_size=8)
    task.load_dataset("train")
    iterator = task.get_batch_iterator(task.dataset("train"), max_sentences=2, seed=3).next_epoch_itr(shuffle=True)
    assert sorted(int(i) for batch in iterator for i in batch["id"]) == list(range(5))
    with pytest.raises(ValueError, match="set --batch-size"):
        task.get_batch_iterator(task.dataset("train"), max_tokens=1000)


def test_train_step_passes_update_num_to_ofa_criteria():
    task = make_task(SnliVeTask, SnliVeConfig)
    calls = []

    class Model:
        def train(self):
            calls.append("train")

        def set_num_updates(self, num):
            calls.append(("updates", num))

    class OFAStyleCriterion:
        def __call__(self, model, sample, update_num=0):
            return self.forward(model, sample, update_num)

        def forward(self, model, sample, update_num=0):
            calls.append(("update_num", update_num))
            return torch.tensor(2.0), 1, {}

    class PlainCriterion(OFAStyleCriterion):
        def __call__(self, model, sample):
            return self.forward(model, sample)

        def forward(self, model, sample):
            calls.append("plain")
            return torch.tensor(2.0), 1, {}

    class Optimizer:
        def backward(self, loss):
            calls.append(("backward", float(loss)))

    task.train_step({}, Model(), OFAStyleCriterion(), Optimizer(), update_num=17)
    task.train_step({}, Model(), PlainCriterion(), Optimizer(), update_num=3, ignore_grad=True)
    assert ("update_num", 17) in calls and "plain" in calls
    assert [c for c in calls if c[0] == "backward"] == [("backward", 2.0), ("backward", 0.0)]


# ----------------------------------------------------------------- OFA checkpoints
def load_fixture_batch(name, make_rows, directory, overrides=None):
    """(model, task, batch, reference): the fixture checkpoint with its task reading the fixture rows as a TSV."""
    require_fixture(name)
    reference = load_reference(name)
    path = write_tsv(directory / f"{name}.tsv", make_rows(reference))
    model, _, task = load_fixture_model(name, {"data": f"{path},{path}", **(overrides or {})})
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return model, task, dataset.collater([dataset[i] for i in range(len(dataset))]), reference


@pytest.fixture(scope="module")
def snli_fixture(tmp_path_factory):
    return load_fixture_batch("snli_ve", snli_fixture_rows, tmp_path_factory.mktemp("snli"))


def test_snli_ve_checkpoint_loads_with_its_task(snli_fixture):
    model, task, batch, reference = snli_fixture
    assert isinstance(task, SnliVeTask)
    assert (task.cfg.prompt_type, task.cfg.add_caption, task.cfg.patch_image_size) == ("prev_output", True, 288)
    assert len(task.target_dictionary) == reference["dict_size"]
    assert [t.tolist() for t in task.answer_tokens] == reference["snli_answer_token_ids"]
    assert list(task.index2ans.values()) == reference["snli_answer_order"]
    assert torch.equal(batch["net_input"]["src_tokens"], reference["src_tokens"])


def test_snli_ve_candidate_batch_matches_ofa(snli_fixture):
    _, task, batch, reference = snli_fixture
    masks = answer_constraint_masks(task.answer_tokens, task.constraint_trie, len(task.tgt_dict))
    prev_output, targets, candidate_masks = build_candidate_batch(
        batch["decoder_prompts"], task.answer_tokens, masks, task.tgt_dict.pad(), task.tgt_dict.eos()
    )
    assert torch.equal(prev_output, reference["snli_candidate_prev_output_tokens"])
    assert torch.equal(targets, reference["snli_candidate_targets"])
    assert candidate_masks.shape == (9, targets.size(1), len(task.tgt_dict))


def test_snli_ve_answer_scores_match_ofa(snli_fixture):
    model, task, batch, reference = snli_fixture
    scores = task.score_answers(model, batch)
    torch.testing.assert_close(scores, reference["snli_answer_scores"], atol=1e-5, rtol=1e-5)
    assert task.predict_answers(model, batch) == reference["snli_predicted_answers"]
    from mue_fairseq.tasks.snli_ve_scoring import score_snli_ve_candidates

    net_input = batch["net_input"]
    with torch.no_grad():
        encoder_out = model.encoder(
            net_input["src_tokens"], src_lengths=net_input["src_lengths"],
            patch_images=net_input["patch_images"], patch_masks=net_input["patch_masks"],
        )
    in_two_passes = score_snli_ve_candidates(
        model, batch, task.answer_tokens, task.constraint_trie, task.tgt_dict.pad(), task.tgt_dict.eos(),
        answers_per_pass=2, encoder_out=encoder_out,
    )
    torch.testing.assert_close(in_two_passes, scores, atol=1e-5, rtol=1e-5)


def test_snli_ve_valid_step_logs_accuracy(snli_fixture):
    model, task, batch, reference = snli_fixture
    criterion = CrossEntropyCriterion(task, sentence_avg=False)
    with metrics.aggregate() as aggregator:
        _, _, logging_output = task.valid_step(batch, model, criterion)
        task.reduce_metrics([logging_output], criterion)
        values = aggregator.get_smoothed_values()
    labels = [next(iter(ref)) for ref in batch["ref_dict"]]
    correct = sum(p == l for p, l in zip(reference["snli_predicted_answers"], labels))
    assert (logging_output["_snli_score_sum"], logging_output["_snli_cnt"]) == (correct, 3)
    assert values["snli_score"] == round(correct / 3, 4)


def test_snli_ve_generator_gets_the_answer_trie(snli_fixture):
    from mue_fairseq.generation.sequence_generator import OFASequenceGenerator

    model, task, batch, reference = snli_fixture
    generator = task.build_generator([model], argparse.Namespace(beam=2, max_len_b=10, min_len=1))
    assert isinstance(generator, OFASequenceGenerator)
    assert generator.constraint_trie is task.constraint_trie
    hypos = task.inference_step(generator, [model], batch)
    expected = [[h["tokens"].tolist() for h in sample] for sample in reference["generate_beam2"]]
    assert [[h["tokens"].tolist() for h in sample] for sample in hypos] == expected


def test_snli_ve_generated_answers_are_the_decoded_answer_tokens(snli_fixture):
    model, task, batch, reference = snli_fixture
    generator = task.build_generator([model], argparse.Namespace(beam=1, max_len_b=10, min_len=1))
    hypos = task.inference_step(generator, [model], batch)
    assert [h[0]["tokens"].tolist() for h in hypos] == [s[0]["tokens"].tolist() for s in reference["generate_beam1"]]
    by_tokens = {tuple(tokens.tolist()) + (task.tgt_dict.eos(),): answer
                 for tokens, answer in zip(task.answer_tokens, task.ans2label_dict)}
    expected = [by_tokens[tuple(s[0]["tokens"].tolist())] for s in reference["generate_beam1"]]
    assert task.generated_answers(batch, hypos) == expected


@pytest.fixture(scope="module")
def caption_fixture(tmp_path_factory):
    overrides = {"eval_bleu": True, "eval_cider": True,
                 "eval_args": '{"beam": 2, "max_len_b": 10, "min_len": 1}'}
    return load_fixture_batch("caption", caption_fixture_rows, tmp_path_factory.mktemp("caption"), overrides)


def test_caption_checkpoint_loads_with_its_task(caption_fixture):
    model, task, batch, reference = caption_fixture
    assert isinstance(task, CaptionTask)
    assert (task.cfg.selected_cols, task.cfg.patch_image_size) == ("0,4,2", 256)
    assert torch.equal(batch["net_input"]["src_tokens"], reference["src_tokens"])
    assert torch.equal(batch["target"], reference["target"])


def test_caption_validation_generates_like_ofa(caption_fixture):
    model, task, batch, reference = caption_fixture
    hyps, refs = task.inference_captions(task.sequence_generator, batch, model)
    assert hyps == [sample[0]["text"].strip() for sample in reference["generate_beam2"]]
    assert refs == [[text.strip()] for text in _target_texts(task, batch)]


def _target_texts(task, batch):
    return [task.decode(row) for row in batch["target"]]


class _EchoGenerator:
    """Returns each sample's first reference as its hypothesis, so the scores are known."""

    def __init__(self, task):
        self.task = task

    def generate(self, models, sample, prefix_tokens=None, constraints=None):
        return [[{"tokens": row[row.ne(self.task.tgt_dict.pad())]}] for row in sample["target"]]


def test_caption_valid_step_logs_bleu_and_cider(caption_fixture):
    model, task, batch, _ = caption_fixture
    assert task.cfg.eval_bleu and task.cfg.eval_cider
    criterion = CrossEntropyCriterion(task, sentence_avg=False)
    task.sequence_generator = _EchoGenerator(task)
    with metrics.aggregate() as aggregator:
        _, _, logging_output = task.valid_step(batch, model, criterion)
        task.reduce_metrics([logging_output], criterion)
        values = aggregator.get_smoothed_values()
    assert values["bleu"] == 100.0
    if task.cfg.eval_cider:
        from mue_fairseq.metrics.cider import CiderD

        refs = {i: [text.strip()] for i, text in enumerate(_target_texts(task, batch))}
        expected = CiderD(None).compute_score(refs, refs)[1]
        assert logging_output["_cider_cnt"] == 3
        assert math.isclose(logging_output["_cider_score_sum"], float(np.sum(expected)), rel_tol=1e-9)
        assert values["cider"] == round(float(np.mean(expected)), 3)


def test_caption_generator_and_constraint_range(caption_fixture):
    from mue_fairseq.generation.ngram_blocking import RepeatedNGramBlocker
    from mue_fairseq.generation.sequence_generator import OFASequenceGenerator

    model, task, _, _ = caption_fixture
    generator = task.build_generator([model], argparse.Namespace(beam=3, max_len_b=7, no_repeat_ngram_size=3))
    assert isinstance(generator, OFASequenceGenerator)
    assert (generator.beam_size, generator.max_len_b, generator.constraint_trie) == (3, 7, None)
    # OFA's blocking rule, not fairseq-fixed's CPU fallback (which never bans: tests/test_ofa_cli_parity.py)
    assert isinstance(generator.repeat_ngram_blocker, RepeatedNGramBlocker)
    assert generator.repeat_ngram_blocker.ngram_size == 3
    assert task.build_generator([model], argparse.Namespace(beam=1)).repeat_ngram_blocker is None
    task.cfg.constraint_range = "4,100"
    try:
        # OFA's generator takes the range (generation inside it: tests/test_refcoco.py)
        assert task.build_generator([model], argparse.Namespace(beam=1)).model.constraint_range == (4, 100)
        task.cfg.constraint_range = "4"
        with pytest.raises(ValueError, match="--constraint-range must be 'start,end'"):
            task.build_generator([model], argparse.Namespace(beam=1))
    finally:
        task.cfg.constraint_range = None
