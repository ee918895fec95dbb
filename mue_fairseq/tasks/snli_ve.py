"""Task ``snli_ve``: OFA visual entailment, answered as " yes" / " no" / " maybe".

The answers (keys of ``--ans2label-dict``, in order) form an answer trie that
masks training logits (``constraint_masks``), restricts generation, and drives
validation, which scores every answer and logs accuracy as ``snli_score`` (at full depth
for a MuE model; with its exits as ``snli_score_mue``, see `exit_validation`).
"""

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from fairseq.tasks import register_task

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_bpe import decode_tokens, encode_text
from mue_fairseq.data.answer_dataset import PROMPT_TYPES
from mue_fairseq.data.snli_ve_dataset import SnliVeDataset
from mue_fairseq.tasks.exit_validation import full_depth, reduce_exit_metrics, validate_with_exits
from mue_fairseq.tasks.ofa_task import OFAConfig, OFATask, reduce_score
from mue_fairseq.tasks.snli_ve_scoring import best_answers_with_exits, score_snli_ve_candidates


@dataclass
class SnliVeConfig(OFAConfig):
    ans2label_dict: Optional[str] = field(
        default='{"no": 0, "yes":1, "maybe": 2}', metadata={"help": "answer to label dict (JSON)"}
    )
    ans2label_file: Optional[str] = field(
        default=None, metadata={"help": "JSON or pickle file with the answer to label dict; overrides --ans2label-dict"}
    )
    add_caption: bool = field(default=False, metadata={"help": "add caption to encoder"})
    valid_batch_size: int = field(default=20, metadata={"help": "candidate answers scored per decoder pass"})
    prompt_type: Optional[str] = field(
        default=None, metadata={"help": "decoder prompt before the answer: none (default), src or prev_output"}
    )


def load_ans2label(ans2label_dict: Optional[str], ans2label_file: Optional[str]) -> Dict[str, int]:
    """The answer -> label mapping from ``--ans2label-file`` (.json or .pkl) or else ``--ans2label-dict``."""
    if ans2label_file:
        if not os.path.isfile(ans2label_file):
            raise FileNotFoundError(f"--ans2label-file {ans2label_file} does not exist")
        if ans2label_file.endswith(".json"):
            with open(ans2label_file, encoding="utf-8") as handle:
                try:
                    mapping = json.load(handle)
                except json.JSONDecodeError as err:
                    raise ValueError(f"--ans2label-file {ans2label_file} is not valid JSON ({err})") from err
        elif ans2label_file.endswith((".pkl", ".pickle")):
            with open(ans2label_file, "rb") as handle:
                try:
                    mapping = pickle.load(handle)
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
                    raise ValueError(f"--ans2label-file {ans2label_file} is not a readable pickle ({err!r})") from err
        else:
            raise ValueError(f"--ans2label-file {ans2label_file}: expected a .json, .pkl or .pickle file")
        source = ans2label_file
    else:
        try:
            mapping = json.loads(ans2label_dict or "")
        except json.JSONDecodeError as err:
            raise ValueError(f"--ans2label-dict is not valid JSON: {ans2label_dict!r} ({err})") from err
        source = "--ans2label-dict"
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"{source}: expected a non-empty answer -> label mapping, got {str(mapping)[:200]}")
    bad = [answer for answer in mapping if not isinstance(answer, str) or not answer.strip()]
    if bad:
        raise ValueError(f"{source}: answers must be non-empty strings; found {bad[0]!r}")
    return mapping


@register_task("snli_ve", dataclass=SnliVeConfig)
class SnliVeTask(OFATask):
    cfg: SnliVeConfig
    dataset_class = SnliVeDataset

    def __init__(self, cfg: SnliVeConfig, src_dict, tgt_dict):
        if cfg.prompt_type is not None and cfg.prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {cfg.prompt_type!r}")
        if cfg.valid_batch_size <= 0:
            raise ValueError(f"--valid-batch-size must be positive, got {cfg.valid_batch_size}")
        super().__init__(cfg, src_dict, tgt_dict)
        self.ans2label_dict = load_ans2label(cfg.ans2label_dict, cfg.ans2label_file)
        self.index2ans = dict(enumerate(self.ans2label_dict))
        self.answer_tokens: List[torch.Tensor] = []
        self.constraint_trie = AnswerTrie(tgt_dict.eos())
        for answer in self.ans2label_dict:
            tokens = encode_text(" " + answer, self.bpe, tgt_dict)
            self.answer_tokens.append(tokens)
            self.constraint_trie.insert(tokens.tolist() + [tgt_dict.eos()])

    def dataset_options(self) -> Dict[str, Any]:
        return {
            "max_src_length": self.cfg.max_src_length,
            "add_caption": self.cfg.add_caption,
            "constraint_trie": self.constraint_trie,
            "prompt_type": self.cfg.prompt_type,
        }

    def generator_kwargs(self):
        return {"constraint_trie": self.constraint_trie}

    def generated_answers(self, sample, hypos) -> List[str]:
        """The answer text of each sample's best hypothesis (`--snli-mode generate`: OFA's generator
        starts from bos, without the decoder prompt, and the answer trie constrains it)."""
        return [decode_tokens(sample_hypos[0]["tokens"], self.bpe, self.tgt_dict).strip() for sample_hypos in hypos]

    def score_answers(self, model, sample, encoder_out=None, decoder_exit_layers=None) -> torch.Tensor:
        """B x n_answers summed answer log-probabilities (OFA's evaluation protocol).

        decoder_exit_layers: optional list receiving the MuE decoder's layers run per sample.
        """
        return score_snli_ve_candidates(
            model,
            sample,
            self.answer_tokens,
            self.constraint_trie,
            pad=self.tgt_dict.pad(),
            eos=self.tgt_dict.eos(),
            answers_per_pass=self.cfg.valid_batch_size,
            encoder_out=encoder_out,
            decoder_exit_layers=decoder_exit_layers,
        )

    def predict_answers(self, model, sample) -> List[str]:
        """The best-scoring answer of each sample."""
        return self.answer_with_exits(model, sample)[0]

    def answer_with_exits(self, model, sample) -> Tuple[List[str], List[int], List[int], List[List[int]]]:
        """(answers, image layers, text layers, decoder layers) per sample: the best-scoring answer and,
        for a MuE model, where its streams and its answer tokens stopped (see `best_answers_with_exits`)."""
        return best_answers_with_exits(model, sample, self.score_answers, self.index2ans)

    def valid_step(self, sample, model, criterion):
        with full_depth(model):
            loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        validate_with_exits(model, sample, self.answer_with_exits, self._score_logging, logging_output)
        return loss, sample_size, logging_output

    @staticmethod
    def _score_logging(sample, hyps: Sequence[str], suffix: str) -> Dict[str, float]:
        scores = [ref_dict.get(hyp, 0) for ref_dict, hyp in zip(sample["ref_dict"], hyps)]
        return {f"_snli_score{suffix}_sum": sum(scores), f"_snli{suffix}_cnt": len(scores)}

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        for suffix in ("", "_mue"):
            reduce_score(logging_outputs, f"_snli_score{suffix}_sum", f"_snli{suffix}_cnt", f"snli_score{suffix}")
        reduce_exit_metrics(logging_outputs)

