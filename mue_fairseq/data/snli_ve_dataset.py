"""SNLI-VE (visual entailment) samples in OFA's format.

Columns (``--selected-cols``): id, base64 image, hypothesis, caption (premise),
label. Labels map to answer words: entailment -> yes, contradiction -> no,
neutral -> maybe. The source asks whether the image (and, with ``add_caption``,
the premise) implies the hypothesis. ``prompt_type`` decides what the decoder
sees before the answer:

* ``none``: bos, then the answer;
* ``src``: the whole source (bos ... eos), then the answer;
* ``prev_output``: the source without its eos, then the answer.

The target is the answer followed by eos, with pad over the prompt, so the loss
falls on the answer only. With an answer trie, ``constraint_mask`` marks, per
answer position, the tokens the trie allows.
"""

from typing import Any, Dict, List, Optional

import torch
from fairseq.data import data_utils

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_dataset import OFADataset, collate_bool_masks, collate_ofa_samples, pre_caption

SNLI_LABEL_TO_ANSWER = {"contradiction": "no", "entailment": "yes", "neutral": "maybe"}
PROMPT_TYPES = ("none", "src", "prev_output")


def snli_ve_source_text(hypothesis: str, premise: Optional[str]) -> str:
    """OFA's encoder prompt for a cleaned hypothesis (and premise, with ``add_caption``)."""
    if premise is None:
        return f' does the image describe " {hypothesis} "?'
    return f' can image and text1 " {premise} " imply text2 " {hypothesis} "?'


class SnliVeDataset(OFADataset):
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
        # OFA's task default is None, which its dataset rejects; read it as "none".
        prompt_type = prompt_type or "none"
        if prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {prompt_type!r}")
        self.max_src_length = max_src_length
        self.add_caption = add_caption
        self.constraint_trie = constraint_trie
        self.prompt_type = prompt_type

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
            "ref_dict": {answer: 1.0},
        }
        if self.constraint_trie is not None:
            mask = torch.zeros((len(target_item), len(self.tgt_dict)), dtype=torch.bool)
            for i in range(answer_start, len(target_item)):
                allowed = self.constraint_trie.next_tokens(target_item[answer_start:i].tolist())
                mask[i, allowed] = True
            example["constraint_mask"] = mask
        return example

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        batch = self.with_truncated_images(collate_ofa_samples(samples, pad_idx=self.pad, eos_idx=self.eos), samples)
        if not batch:
            return batch
        prompts = [s["decoder_prompt"] for s in samples]
        batch["ref_dict"] = [s["ref_dict"] for s in samples]
        batch["decoder_prompts"] = [prompt.tolist() for prompt in prompts]
        batch["prefix_tokens"] = data_utils.collate_tokens(prompts, self.pad, eos_idx=self.eos)[:, 1:]
        batch["constraint_masks"] = (
            collate_bool_masks([s["constraint_mask"] for s in samples])
            if "constraint_mask" in samples[0]
            else None
        )
        return batch
