"""OFA's samples whose target is a short answer (SNLI-VE, VQA): decoder prompt, loss mask, answer trie.

``prompt_type`` decides what the decoder sees before the answer:

* ``none``: bos, then the answer;
* ``src``: the whole source (bos ... eos), then the answer;
* ``prev_output``: the source without its eos, then the answer.

The target is the answer followed by eos, with pad over the prompt, so the loss falls on the
answer only. With an answer trie, ``constraint_mask`` marks, per answer position, the tokens the
trie allows.
"""

from typing import Any, Dict, List, Optional

import torch
from fairseq.data import data_utils

from mue_fairseq.data.answer_trie import AnswerTrie
from mue_fairseq.data.ofa_dataset import OFADataset, collate_bool_masks

PROMPT_TYPES = ("none", "src", "prev_output")


class OFAAnswerDataset(OFADataset):
    """An `OFADataset` whose subclasses build samples with `answer_sample` and batches with
    `collate_answers`."""

    prompt_type: str = "none"
    constraint_trie: Optional[AnswerTrie] = None

    def set_answer_options(self, constraint_trie: Optional[AnswerTrie], prompt_type: Optional[str]) -> None:
        # OFA's task default is None, which its dataset rejects; read it as "none".
        prompt_type = prompt_type or "none"
        if prompt_type not in PROMPT_TYPES:
            raise ValueError(f"--prompt-type must be one of {', '.join(PROMPT_TYPES)}, got {prompt_type!r}")
        self.constraint_trie = constraint_trie
        self.prompt_type = prompt_type

    def answer_sample(self, uniq_id, src_item: torch.Tensor, patch_image: torch.Tensor, tgt_item: torch.Tensor,
                      ref_dict: Dict[str, float]) -> Dict[str, Any]:
        """The sample of a source (bos ... eos) and its answer tokens (no bos/eos)."""
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
        }
        if self.constraint_trie is not None:
            mask = torch.zeros((len(target_item), len(self.tgt_dict)), dtype=torch.bool)
            for i in range(answer_start, len(target_item)):
                mask[i, self.constraint_trie.next_tokens(target_item[answer_start:i].tolist())] = True
            example["constraint_mask"] = mask
        return example

    def collate_answers(self, batch: Dict[str, Any], samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Add to an OFA batch the references, decoder prompts (also as forced prefix tokens, bos
        left out) and constraint masks of its samples."""
        if not batch:
            return batch
        prompts = [s["decoder_prompt"] for s in samples]
        batch["ref_dict"] = [s["ref_dict"] for s in samples]
        batch["decoder_prompts"] = [prompt.tolist() for prompt in prompts]
        batch["prefix_tokens"] = data_utils.collate_tokens(prompts, self.pad, eos_idx=self.eos)[:, 1:]
        batch["constraint_masks"] = (
            collate_bool_masks([s["constraint_mask"] for s in samples]) if "constraint_mask" in samples[0] else None
        )
        return batch
