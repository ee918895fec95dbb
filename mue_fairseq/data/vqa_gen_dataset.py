"""VQA samples in OFA's format (task ``vqa_gen``).

Columns (``--selected-cols``, OFA's ``0,5,2,3,4``): question id, base64 image, question, answers,
detected object labels (and optionally a caption, read and ignored, as OFA does). The answers
column is ``conf|!+answer`` entries joined by ``&&`` (VQA's soft scores); the target is the
answer of highest confidence, and a prediction scores the confidence of the answer it gives.
With ``add_object`` the source also lists the object labels (``&&``-separated). The decoder
prompt (``prompt_type``), the target and the answer trie masks are built as `answer_dataset` describes.
"""

import re
from typing import Any, Dict, List, Optional

import torch

from mue_fairseq.data.answer_dataset import OFAAnswerDataset
from mue_fairseq.data.answer_trie import AnswerTrie

ANSWER_SEPARATOR = "&&"
CONFIDENCE_SEPARATOR = "|!+"


def pre_question(question: str, max_words: int) -> str:
    """OFA's question cleaning (its caption cleaning less the ``<person>`` rule), ending with '?'."""
    question = question.lower().lstrip(",.!?*#:;~").replace("-", " ").replace("/", " ")
    question = re.sub(r"\s{2,}", " ", question).rstrip("\n").strip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question if question.endswith("?") else question + "?"


def parse_answers(text: str, where: str) -> Dict[str, float]:
    """OFA's answers column ``conf|!+answer&&...`` as {answer: confidence}; a later duplicate wins."""
    answers = {}
    for entry in text.split(ANSWER_SEPARATOR):
        confidence, separator, answer = entry.partition(CONFIDENCE_SEPARATOR)
        try:
            value = float(confidence)
        except ValueError:
            value = None
        if not separator or value is None or not answer:
            raise ValueError(
                f"{where}: answer entry {entry!r} is not 'confidence|!+answer' "
                f"(answers column {text[:200]!r})"
            )
        answers[answer] = value
    return answers


class VqaGenDataset(OFAAnswerDataset):
    def __init__(
        self,
        split: str,
        dataset,
        bpe,
        src_dict,
        tgt_dict,
        max_src_length: int = 128,
        max_object_length: int = 30,
        max_tgt_length: int = 30,
        patch_image_size: int = 224,
        add_object: bool = False,
        constraint_trie: Optional[AnswerTrie] = None,
        imagenet_default_mean_and_std: bool = False,
        prompt_type: Optional[str] = "none",
        candidates: Optional[Dict[str, int]] = None,
    ):
        super().__init__(split, dataset, bpe, src_dict, tgt_dict, patch_image_size, imagenet_default_mean_and_std)
        if len(dataset.selected_cols) not in (5, 6):
            raise ValueError(
                f"{type(self).__name__} reads 5 columns (id, image, question, answers, objects; a 6th, a "
                f"caption, is ignored) but --selected-cols gives {len(dataset.selected_cols)} "
                f"({dataset.selected_cols}) for {dataset.path}"
            )
        self.set_answer_options(constraint_trie, prompt_type)
        self.max_src_length = max_src_length
        self.max_object_length = max_object_length
        self.max_tgt_length = max_tgt_length
        self.add_object = add_object
        self.candidates = candidates

    def __getitem__(self, index: int) -> Dict[str, Any]:
        uniq_id, image, question, answers_text, objects = self.dataset[index][:5]
        where = f"row {uniq_id} ({self.dataset.path}, line {self.dataset.line_number(index)})"
        ref_dict = parse_answers(answers_text, where)
        answer = max(ref_dict, key=ref_dict.get)
        if self.constraint_trie is not None and self.candidates is not None and answer not in self.candidates:
            raise ValueError(
                f"{where}: answer {answer!r} (confidence {ref_dict[answer]}) is not a candidate answer of "
                "--ans2label-file / --ans2label-dict, so the answer trie gives it no path (an infinite loss); "
                "add it to the candidates or train with --unconstrained-training"
            )
        patch_image = self.load_patch_image(image, uniq_id, index)

        src_item = self.encode_text(" " + pre_question(question, self.max_src_length))
        if self.add_object:
            labels = " ".join(objects.strip().split(ANSWER_SEPARATOR)[: self.max_object_length])
            src_item = torch.cat([src_item, self.encode_text(f" object: {labels}")])
        src_item = torch.cat([self.bos_item, src_item, self.eos_item])
        tgt_item = self.encode_text(" " + answer)[: self.max_tgt_length]
        example = self.answer_sample(uniq_id, src_item, patch_image, tgt_item, ref_dict)
        example["conf"] = torch.tensor([ref_dict[answer]])
        return example

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        batch = self.collate_answers(self.collate_samples(samples), samples)
        if batch:
            batch["conf"] = torch.cat([s["conf"] for s in samples])
        return batch
