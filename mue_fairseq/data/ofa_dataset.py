"""Shared base of OFA's multimodal datasets and OFA's batch layout.

A sample is a dict with ``id``, ``source`` (bos + prompt + eos), ``patch_image``
(3 x S x S), ``patch_mask`` (1-element bool), ``target`` and
``prev_output_tokens``, plus task extras. ``collate_ofa_samples`` builds the
batch OFA's models and criteria read: ``id``, ``nsentences``, ``ntokens``,
``net_input`` = {src_tokens, src_lengths, patch_images, patch_masks,
prev_output_tokens} and ``target``, all right-padded with pad.
"""

import re
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset, data_utils

from mue_fairseq.data.image_transform import PatchImageTransform, decode_base64_image
from mue_fairseq.data.ofa_bpe import encode_text
from mue_fairseq.data.tsv_file import TSVFile

_LEADING_PUNCTUATION = ",.!?*#:;~"
_REPEATED_WHITESPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int) -> str:
    """OFA's text cleaning: lower-case, strip leading punctuation, '-' and '/' to spaces, cut to ``max_words`` words."""
    caption = (
        caption.lower()
        .lstrip(_LEADING_PUNCTUATION)
        .replace("-", " ")
        .replace("/", " ")
        .replace("<person>", "person")
    )
    caption = _REPEATED_WHITESPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def collate_bool_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack L_i x V bool masks into B x max(L) x V; padded rows are all True.

    OFA pads constraint masks with the pad index (1, i.e. True), so a padded
    position allows every token and masking it is a no-op.
    """
    length = max(mask.size(0) for mask in masks)
    out = masks[0].new_ones(len(masks), length, masks[0].size(1))
    for i, mask in enumerate(masks):
        out[i, : mask.size(0)] = mask
    return out


def collate_ofa_samples(samples: List[Dict[str, Any]], pad_idx: int, eos_idx: int) -> Dict[str, Any]:
    """OFA's batch of ``samples`` (an empty dict for no samples, as fairseq expects)."""
    if len(samples) == 0:
        return {}

    def merge(key: str) -> torch.Tensor:
        return data_utils.collate_tokens([s[key] for s in samples], pad_idx, eos_idx=eos_idx)

    src_tokens = merge("source")
    src_lengths = torch.LongTensor([s["source"].ne(pad_idx).long().sum() for s in samples])
    patch_images = torch.stack([s["patch_image"] for s in samples], dim=0)
    patch_masks = torch.cat([s["patch_mask"] for s in samples])

    target = None
    prev_output_tokens = None
    if samples[0].get("target") is not None:
        target = merge("target")
        ntokens = sum(int(s["target"].ne(pad_idx).long().sum()) for s in samples)
        if samples[0].get("prev_output_tokens") is not None:
            prev_output_tokens = merge("prev_output_tokens")
    else:
        ntokens = int(src_lengths.sum())

    return {
        "id": np.array([s["id"] for s in samples]),
        "nsentences": len(samples),
        "ntokens": ntokens,
        "net_input": {
            "src_tokens": src_tokens,
            "src_lengths": src_lengths,
            "patch_images": patch_images,
            "patch_masks": patch_masks,
            "prev_output_tokens": prev_output_tokens,
        },
        "target": target,
    }


class OFADataset(FairseqDataset):
    """Rows of a TSV file turned into OFA samples; subclasses define ``__getitem__``.

    Indices are served in file order; fairseq's batch iterator shards and
    shuffles batches.
    """

    #: names of the columns ``--selected-cols`` must pick, in order
    columns: Sequence[str] = ()

    def __init__(
        self,
        split: str,
        dataset: TSVFile,
        bpe,
        src_dict: Dictionary,
        tgt_dict: Dictionary,
        patch_image_size: int,
        imagenet_default_mean_and_std: bool = False,
    ):
        if self.columns and len(dataset.selected_cols) != len(self.columns):
            raise ValueError(
                f"{type(self).__name__} reads {len(self.columns)} columns "
                f"({', '.join(self.columns)}) but --selected-cols gives "
                f"{len(dataset.selected_cols)} ({dataset.selected_cols}) for {dataset.path}"
            )
        self.split = split
        self.dataset = dataset
        self.bpe = bpe
        self.src_dict = src_dict
        self.tgt_dict = tgt_dict
        self.bos = src_dict.bos()
        self.eos = src_dict.eos()
        self.pad = src_dict.pad()
        self.bos_item = torch.LongTensor([self.bos])
        self.eos_item = torch.LongTensor([self.eos])
        self.patch_transform = PatchImageTransform.for_task(
            patch_image_size, imagenet_default_mean_and_std
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def encode_text(self, text: str) -> torch.LongTensor:
        """Dictionary ids of ``text`` (no bos/eos)."""
        return encode_text(text, self.bpe, self.tgt_dict)

    def load_patch_image(self, image_base64: str, row_id: str, index: int) -> torch.Tensor:
        """Preprocessed image tensor of row ``index`` (whose id column is ``row_id``)."""
        where = f"{row_id} ({self.dataset.path}, line {self.dataset.line_number(index)})"
        return self.patch_transform(decode_base64_image(image_base64, where))

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        return collate_ofa_samples(samples, pad_idx=self.pad, eos_idx=self.eos)
