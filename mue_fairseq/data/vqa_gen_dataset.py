"""VQA samples in OFA's format (task ``vqa_gen``).

Columns (``--selected-cols``, OFA's ``0,5,2,3,4``): question id, base64 image, question, answers,
detected object labels (and optionally a caption, read and ignored, as OFA does). The answers
column is ``conf|!+answer`` entries joined by ``&&`` (VQA's soft scores); the target is the
answer of highest confidence, and a prediction scores the confidence of the answer it gives.
With ``add_object`` the source also lists the object labels (``&&``-separated). The decoder
prompt (``prompt_type``) and the answer trie masks are as in SNLI-VE (`snli_ve_dataset`).
"""

import re
from typing import Any, Dict, List, Optional

import torch
from fairseq.data import data_utils

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_dataset import OFADataset, collate_bool_masks, collate_ofa_samples
from mue_fairseq.data.snli_ve_dataset import PROMPT_TYPES

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


class VqaGenDataset(OFADataset):
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
        # OFA's task default is None, which its dataset rejects; read it as "none".
        prompt_type = prompt_type or "none"
        if prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {prompt_type!r}")
        self.max_src_length = max_src_length
        self.max_object_length = max_object_length
        self.max_tgt_length = max_tgt_length
        self.add_object = add_object
        self.constraint_trie = constraint_trie
        self.prompt_type = prompt_type
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

        if self.prompt_type == "none":
            decoder_prompt = self.bos_item
        elif self.prompt_type == "src":
            decoder_prompt = src_item
        else:
            decoder_prompt = src_item[:-1]
        prev_output_item = torch.cat([decoder_prompt, tgt_item])
        target_item = torch.cat([prev_output_item[1:], self.eos_item])
        answer_start = len(target_item) - len(tgt_item) - 1
        target_item[:answer_start] = self.tgt_dict.pad()

        example = {
            "id": uniq_id,
            "source": src_item,
            "patch_image": patch_image,
            "patch_mask": torch.tensor([True]),
            "target": target_item,
            "prev_output_tokens": prev_output_item,
            "decoder_prompt": decoder_prompt,
            "ref_dict": ref_dict,
            "conf": torch.tensor([ref_dict[answer]]),
        }
        if self.constraint_trie is not None:
            mask = torch.zeros((len(target_item), len(self.tgt_dict)), dtype=torch.bool)
            for i in range(answer_start, len(target_item)):
                mask[i, self.constraint_trie.next_tokens(target_item[answer_start:i].tolist())] = True
            example["constraint_mask"] = mask
        return example

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        batch = collate_ofa_samples(samples, pad_idx=self.pad, eos_idx=self.eos)
        if not batch:
            return batch
        prompts = [s["decoder_prompt"] for s in samples]
        batch["conf"] = torch.cat([s["conf"] for s in samples])
        batch["ref_dict"] = [s["ref_dict"] for s in samples]
        batch["decoder_prompts"] = [prompt.tolist() for prompt in prompts]
        batch["prefix_tokens"] = data_utils.collate_tokens(prompts, self.pad, eos_idx=self.eos)[:, 1:]
        batch["constraint_masks"] = (
            collate_bool_masks([s["constraint_mask"] for s in samples]) if "constraint_mask" in samples[0] else None
        )
        return batch
