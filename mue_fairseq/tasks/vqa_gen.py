"""Task ``vqa_gen``: OFA's generative VQA, scored by VQA accuracy (the soft score of the answer given).

The candidate answers (keys of ``--ans2label-file`` / ``--ans2label-dict``) form an answer trie
that masks the training logits and constrains inference, which runs in one of OFA's two modes
(``--val-inference-type``; `evaluate` sets it from ``--beam-search-vqa-eval`` as OFA's
evaluate.py does):

* ``allcand``: every candidate scored in one teacher-forced pass per ``--valid-batch-size``
  candidates (`snli_ve_scoring`); a question's candidates share one exit depth;
* ``beamsearch``: beam search from the decoder prompt, inside the trie (``--eval-args``).

``--unconstrained-training`` drops the candidate set (open-ended answers; beam search only).
A prediction scores the confidence its answer has in the row's answers column; validation
logs the mean as ``vqa_score`` (at full depth; ``vqa_score_mue`` with a MuE model's exits).
"""

from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq.tasks import register_task

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_bpe import decode_tokens, encode_text
from mue_fairseq.data.answer_dataset import PROMPT_TYPES
from mue_fairseq.data.vqa_gen_dataset import VqaGenDataset
from mue_fairseq.tasks.caption import _parse_json_option
from mue_fairseq.tasks.exit_validation import (
    full_depth,
    hypothesis_exit_layers,
    reduce_exit_metrics,
    validate_with_exits,
)
from mue_fairseq.tasks.ofa_task import OFAConfig, OFATask, reduce_score
from mue_fairseq.tasks.snli_ve import load_ans2label
from mue_fairseq.tasks.snli_ve_scoring import best_answers_with_exits, score_snli_ve_candidates

INFERENCE_TYPES = ("allcand", "beamsearch")


@dataclass
class VqaGenConfig(OFAConfig):
    max_object_length: int = field(default=30, metadata={"help": "the most object labels added with --add-object"})
    ans2label_dict: Optional[str] = field(
        default='{"no": 0, "yes":1}', metadata={"help": "candidate answer -> label dict (JSON)"}
    )
    ans2label_file: Optional[str] = field(
        default=None, metadata={"help": "pickle (.pkl) or JSON file with the candidate answer -> label dict; "
                                        "overrides --ans2label-dict"}
    )
    unconstrained_training: bool = field(
        default=False, metadata={"help": "open-ended answers: no candidate set or trie (needs beamsearch inference)"}
    )
    add_object: bool = field(default=False, metadata={"help": "append the detected object labels to the question"})
    valid_batch_size: int = field(default=20, metadata={"help": "candidate answers scored per decoder pass (allcand)"})
    prompt_type: Optional[str] = field(
        default=None, metadata={"help": "decoder prompt before the answer: none (default), src or prev_output"}
    )
    uses_ema: Optional[bool] = field(
        default=False, metadata={"help": "validate the EMA model (fairseq's --store-ema) instead of the trained one"}
    )
    val_inference_type: Optional[str] = field(
        default="allcand", metadata={"help": "inference in validation and evaluation: allcand or beamsearch"}
    )
    eval_args: Optional[str] = field(
        default='{"beam":5,"unnormalized":true,"temperature":1.0}',
        metadata={"help": "generation args (JSON) for --val-inference-type beamsearch"},
    )


@register_task("vqa_gen", dataclass=VqaGenConfig)
class VqaGenTask(OFATask):
    cfg: VqaGenConfig
    dataset_class = VqaGenDataset

    def __init__(self, cfg: VqaGenConfig, src_dict, tgt_dict):
        if cfg.val_inference_type not in INFERENCE_TYPES:
            raise ValueError(f"--val-inference-type must be allcand or beamsearch, got {cfg.val_inference_type!r}")
        if cfg.unconstrained_training and cfg.val_inference_type != "beamsearch":
            raise ValueError("--unconstrained-training has no candidate answers to score: "
                             "use --val-inference-type beamsearch")
        if cfg.prompt_type is not None and cfg.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {cfg.prompt_type!r}")
        if cfg.valid_batch_size <= 0:
            raise ValueError(f"--valid-batch-size must be positive, got {cfg.valid_batch_size}")
        super().__init__(cfg, src_dict, tgt_dict)
        self.uses_ema = bool(cfg.uses_ema)
        self.eval_args = _parse_json_option("eval_args", cfg.eval_args)
        self.generator = None
        self.ans2label_dict: Optional[Dict[str, int]] = None
        self.constraint_trie: Optional[AnswerTrie] = None
        self.answer_tokens: List[torch.Tensor] = []
        self.index2ans: Dict[int, str] = {}
        if not cfg.unconstrained_training:
            self.ans2label_dict = load_ans2label(cfg.ans2label_dict, cfg.ans2label_file)
            self.constraint_trie = AnswerTrie(tgt_dict.eos())
            for i, answer in enumerate(self.ans2label_dict):
                tokens = encode_text(" " + answer, self.bpe, tgt_dict)
                self.answer_tokens.append(tokens)
                self.index2ans[i] = answer
                self.constraint_trie.insert(tokens.tolist() + [tgt_dict.eos()])

    @property
    def answers_by_scoring(self) -> bool:
        """Whether inference scores every candidate (allcand) rather than generating (beamsearch)."""
        return self.cfg.val_inference_type == "allcand"

    def dataset_options(self) -> Dict[str, Any]:
        return {
            "max_src_length": self.cfg.max_src_length,
            "max_object_length": self.cfg.max_object_length,
            "max_tgt_length": self.cfg.max_tgt_length,
            "add_object": self.cfg.add_object,
            "constraint_trie": self.constraint_trie,
            "prompt_type": self.cfg.prompt_type,
            "candidates": self.ans2label_dict,
        }

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        if not self.answers_by_scoring:
            self.generator = self.build_generator([model], Namespace(**self.eval_args))
        return model

    def generator_kwargs(self):
        return {"constraint_trie": self.constraint_trie}

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """Generation after the decoder prompt: OFA passes the batch's prompt as forced prefix tokens."""
        if prefix_tokens is None:
            prefix_tokens = sample.get("prefix_tokens")
        return super().inference_step(generator, models, sample, prefix_tokens=prefix_tokens, constraints=constraints)

    # ------------------------------------------------------------ answers
    def generated_answers(self, sample, hypos) -> List[str]:
        """The answer text of each sample's best hypothesis, its forced prompt tokens left out."""
        answers = []
        for prefix, sample_hypos in zip(sample["prefix_tokens"], hypos):
            prefix_len = int(prefix.ne(self.tgt_dict.pad()).sum())
            answers.append(decode_tokens(sample_hypos[0]["tokens"][prefix_len:], self.bpe, self.tgt_dict).strip())
        return answers

    def score_answers(self, model, sample, encoder_out=None, decoder_exit_layers=None) -> torch.Tensor:
        """B x n_candidates summed answer log-probabilities (OFA's allcand protocol)."""
        return score_snli_ve_candidates(
            model, sample, self.answer_tokens, self.constraint_trie, pad=self.tgt_dict.pad(), eos=self.tgt_dict.eos(),
            answers_per_pass=self.cfg.valid_batch_size, encoder_out=encoder_out,
            decoder_exit_layers=decoder_exit_layers,
        )

    def answer_with_exits(self, model, sample) -> Tuple[List[str], List[int], List[int], List[List[int]]]:
        """(answers, image layers, text layers, decoder layers) per sample in allcand mode."""
        return best_answers_with_exits(model, sample, self.score_answers, self.index2ans)

    def evaluation_rows(self, sample, outputs) -> Tuple[List[dict], List[float]]:
        """OFA's prediction rows (question_id, answer) and each row's VQA score; ``outputs`` are the
        answers (allcand) or the generator's hypotheses (beamsearch)."""
        answers = outputs if self.answers_by_scoring else self.generated_answers(sample, outputs)
        rows = [{"question_id": _question_id(i), "answer": a} for i, a in zip(sample["id"].tolist(), answers)]
        return rows, vqa_scores(sample["ref_dict"], answers)

    # -------------------------------------------------------- training and validation
    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False, **extra_kwargs):
        # fairseq passes the EMA model when the task uses it; training itself does not need it.
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion, **extra_kwargs):
        eval_model = model
        if self.uses_ema:
            eval_model = extra_kwargs.get("ema_model")
            if eval_model is None:
                raise ValueError("--uses-ema validates the EMA model: train with --store-ema")
        with full_depth(model):
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        validate_with_exits(eval_model, sample, self._answers, _score_logging, logging_output)
        return loss, sample_size, logging_output

    def _answers(self, model, sample) -> Tuple[List[str], Sequence[int], Sequence[int], List[List[int]]]:
        """(answers, image layers, text layers, decoder layers per sample) in the configured mode."""
        if self.answers_by_scoring:
            return self.answer_with_exits(model, sample)
        hypos = self.inference_step(self.generator, [model], sample)
        return (self.generated_answers(sample, hypos), *hypothesis_exit_layers(model, hypos))

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        for suffix in ("", "_mue"):
            reduce_score(logging_outputs, f"_vqa_score{suffix}_sum", f"_vqa{suffix}_cnt", f"vqa_score{suffix}")
        reduce_exit_metrics(logging_outputs)


def vqa_scores(ref_dicts: Sequence[Dict[str, float]], answers: Sequence[str]) -> List[float]:
    """OFA's VQA accuracy of each answer: its confidence in the row's answers column, 0 if absent."""
    return [float(ref_dict.get(answer, 0)) for ref_dict, answer in zip(ref_dicts, answers)]


def _question_id(value):
    """OFA writes ``int(question_id)``; ids that are not integers stay as they are."""
    text = str(value)
    return int(text) if text.lstrip("-").isdigit() else text


def _score_logging(sample, answers: Sequence[str], suffix: str) -> Dict[str, float]:
    scores = vqa_scores(sample["ref_dict"], answers)
    return {f"_vqa_score{suffix}_sum": sum(scores), f"_vqa{suffix}_cnt": len(scores)}

