"""SNLI-VE (visual entailment) samples in OFA's format.

Columns (``--selected-cols``): id, base64 image, hypothesis, caption (premise),
label. Labels map to answer words: entailment -> yes, contradiction -> no,
neutral -> maybe. The source asks whether the image (and, with ``add_caption``,
the premise) implies the hypothesis. The decoder prompt (``prompt_type``), the
target and the answer trie masks are built as `answer_dataset` describes.
"""

from typing import Any, Dict, List, Optional

import torch

from mue_fairseq.data.answer_dataset import OFAAnswerDataset
from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_dataset import pre_caption

SNLI_LABEL_TO_ANSWER = {"contradiction": "no", "entailment": "yes", "neutral": "maybe"}


def snli_ve_source_text(hypothesis: str, premise: Optional[str]) -> str:
    """OFA's encoder prompt for a cleaned hypothesis (and premise, with ``add_caption``)."""
    if premise is None:
        return f' does the image describe " {hypothesis} "?'
    return f' can image and text1 " {premise} " imply text2 " {hypothesis} "?'


class SnliVeDataset(OFAAnswerDataset):
    columns = ("id", "image", "hypothesis", "caption", "label")

    def __init__(
        self,
        split: str,
        dataset,
        bpe,
        src_dict,
        tgt_dict,
        max_src_length: int = 80,
        patch_image_size: int = 224,
        add_caption: bool = False,
        constraint_trie: Optional[AnswerTrie] = None,
        imagenet_default_mean_and_std: bool = False,
        prompt_type: Optional[str] = "none",
    ):
        super().__init__(
            split, dataset, bpe, src_dict, tgt_dict, patch_image_size, imagenet_default_mean_and_std
        )
        self.set_answer_options(constraint_trie, prompt_type)
        self.max_src_length = max_src_length
        self.add_caption = add_caption

    def __getitem__(self, index: int) -> Dict[str, Any]:
        uniq_id, image, hypothesis, caption, label = self.dataset[index]
        answer = SNLI_LABEL_TO_ANSWER.get(label)
        if answer is None:
            raise ValueError(
                f"row {uniq_id} ({self.dataset.path}, line {self.dataset.line_number(index)}): "
                f"unknown label {label!r}; expected one of {', '.join(SNLI_LABEL_TO_ANSWER)}"
            )
        patch_image = self.load_patch_image(image, uniq_id, index)

        hypothesis = pre_caption(hypothesis, self.max_src_length)
        if not hypothesis:
            self.warn_empty_text("hypothesis", uniq_id, index)
        premise = pre_caption(caption, self.max_src_length) if self.add_caption else None
        src_item = self.encode_text(snli_ve_source_text(hypothesis, premise))
        src_item = torch.cat([self.bos_item, src_item, self.eos_item])
        tgt_item = self.encode_text(" " + answer)
        return self.answer_sample(uniq_id, src_item, patch_image, tgt_item, {answer: 1.0})

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        return self.collate_answers(self.collate_samples(samples), samples)
