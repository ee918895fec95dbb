"""Image captioning samples in OFA's format.

Columns (``--selected-cols``): id, base64 image, caption. The encoder reads the
fixed prompt " what does the image describe?"; the decoder learns the caption.
Training rows hold one caption, cleaned of punctuation and cut to
``max_tgt_length`` words. Other splits (and SCST training, whose reward needs
every reference) keep all references joined by ``&&``, each cleaned of
punctuation, so evaluation can split them again.
"""

import string
from typing import Any, Dict

import torch

from mue_fairseq.data.ofa_dataset import OFADataset

CAPTION_PROMPT = " what does the image describe?"
_PUNCTUATION_TABLE = str.maketrans({char: None for char in string.punctuation})
REFERENCE_SEPARATOR = "&&"


def strip_punctuation(text: str) -> str:
    """``text`` without ASCII punctuation, as OFA cleans captions and generated text."""
    return text.translate(_PUNCTUATION_TABLE)


def clean_caption(caption: str, training: bool, max_words: int) -> str:
    """OFA's caption target: one cut caption for training, ``&&``-joined references otherwise."""
    if training:
        words = strip_punctuation(caption).strip().split()
        return " ".join(words[:max_words])
    caption = " ".join(caption.strip().split())
    references = [strip_punctuation(ref).strip() for ref in caption.split(REFERENCE_SEPARATOR)]
    return REFERENCE_SEPARATOR.join(references)


class CaptionDataset(OFADataset):
    columns = ("id", "image", "caption")

    def __init__(
        self,
        split: str,
        dataset,
        bpe,
        src_dict,
        tgt_dict,
        max_tgt_length: int = 30,
        patch_image_size: int = 224,
        imagenet_default_mean_and_std: bool = False,
        scst: bool = False,
    ):
        super().__init__(
            split, dataset, bpe, src_dict, tgt_dict, patch_image_size, imagenet_default_mean_and_std
        )
        self.max_tgt_length = max_tgt_length
        self.scst = scst
        self.src_item = torch.cat([self.bos_item, self.encode_text(CAPTION_PROMPT), self.eos_item])

    def __getitem__(self, index: int) -> Dict[str, Any]:
        uniq_id, image, caption = self.dataset[index]
        patch_image = self.load_patch_image(image, uniq_id, index)
        training = self.split == "train" and not self.scst
        tgt_caption = clean_caption(caption, training, self.max_tgt_length)
        if training and not tgt_caption:
            self.warn_empty_text("caption", uniq_id, index)
        if self.scst and self.split == "train":
            self.check_references(tgt_caption, uniq_id, index)
        tgt_item = self.encode_text(" " + tgt_caption)
        return {
            "id": uniq_id,
            "source": self.src_item.clone(),
            "patch_image": patch_image,
            "patch_mask": torch.tensor([True]),
            "target": torch.cat([tgt_item, self.eos_item]),
            "prev_output_tokens": torch.cat([self.bos_item, tgt_item]),
        }

    def check_references(self, references: str, uniq_id: str, index: int) -> None:
        """An SCST training row must hold references, none of them empty: its rewards would score
        against an empty sentence."""
        items = references.split(REFERENCE_SEPARATOR)
        empty = [number for number, item in enumerate(items, start=1) if not item.strip()]
        if empty:
            where = f"{self.dataset.path}, line {self.dataset.line_number(index)} (id {uniq_id})"
            what = "no references" if len(items) == 1 else f"reference(s) {empty} of {len(items)} empty"
            raise ValueError(
                f"{where}: {what} in the caption column; per-image rows join one or more non-empty "
                f"captions with '{REFERENCE_SEPARATOR}'"
            )
