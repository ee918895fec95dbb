"""Shared base of OFA's multimodal datasets and OFA's batch layout.

A sample is a dict with ``id``, ``source`` (bos + prompt + eos), ``patch_image``
(3 x S x S), ``patch_mask`` (1-element bool), ``target`` and
``prev_output_tokens``, plus task extras. ``collate_ofa_samples`` builds the
batch OFA's models and criteria read: ``id``, ``nsentences``, ``ntokens``,
``net_input`` = {src_tokens, src_lengths, patch_images, patch_masks,
prev_output_tokens} and ``target``, all right-padded with pad.
"""

import logging
import re
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from fairseq.data import Dictionary, FairseqDataset

from mue_fairseq.data.image_transform import PatchImageTransform, decode_base64_image
from mue_fairseq.data.ofa_bpe import encode_text
from mue_fairseq.data.tsv_file import TSVFile

logger = logging.getLogger(__name__)

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


def pad_right(rows: Sequence[torch.Tensor], fill) -> torch.Tensor:
    """Stack 1-D (or L_i x ...) tensors into B x max(L_i) x ..., filling the tail of shorter rows."""
    longest = max(row.size(0) for row in rows)
    out = rows[0].new_full((len(rows), longest) + tuple(rows[0].shape[1:]), fill)
    for slot, row in zip(out, rows):
        slot[: row.size(0)] = row
    return out


def collate_bool_masks(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack L_i x V bool masks into B x max(L) x V; padded rows are all True.

    OFA pads constraint masks with the pad index (1, i.e. True), so a padded
    position allows every token and masking it is a no-op.
    """
    return pad_right(masks, True)


def _non_pad_counts(tokens: torch.Tensor, pad_idx: int) -> torch.Tensor:
    return tokens.ne(pad_idx).sum(dim=1)


def collate_ofa_samples(samples: List[Dict[str, Any]], pad_idx: int, eos_idx: int) -> Dict[str, Any]:
    """OFA's batch of ``samples`` (an empty dict for no samples, as fairseq expects).

    ``eos_idx`` is accepted for the callers' symmetry with fairseq's collaters; right padding
    never moves eos.
    """
    if not samples:
        return {}
    first = samples[0]

    def column(key: str) -> List[Any]:
        return [sample[key] for sample in samples]

    net_input: Dict[str, Any] = {"src_tokens": pad_right(column("source"), pad_idx)}
    net_input["src_lengths"] = _non_pad_counts(net_input["src_tokens"], pad_idx)
    net_input["patch_images"] = torch.stack(column("patch_image"))
    net_input["patch_masks"] = torch.cat(column("patch_mask"))
    has_target = first.get("target") is not None
    teacher_forced = has_target and first.get("prev_output_tokens") is not None
    net_input["prev_output_tokens"] = pad_right(column("prev_output_tokens"), pad_idx) if teacher_forced else None

    target = pad_right(column("target"), pad_idx) if has_target else None
    # fairseq normalises the loss by target tokens; without targets, by source tokens
    counted = target if has_target else net_input["src_tokens"]
    batch: Dict[str, Any] = {"id": np.array(column("id")), "nsentences": len(samples)}
    batch["ntokens"] = int(_non_pad_counts(counted, pad_idx).sum())
    batch["net_input"] = net_input
    batch["target"] = target
    return batch


class OFADataset(FairseqDataset):
    """Rows of a TSV file turned into OFA samples; subclasses define ``__getitem__``.

    Indices are served in file order; fairseq's batch iterator shards and
    shuffles batches.
    """

    #: names of the columns ``--selected-cols`` must pick, in order
    columns: Sequence[str] = ()
    #: a truncated image is an error (``--strict-images``), else a warning and a count
    strict_images: bool = False

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
        self.split, self.dataset, self.bpe = split, dataset, bpe
        self.src_dict, self.tgt_dict = src_dict, tgt_dict
        # special symbols come from the source dictionary (OFA's two dictionaries are one)
        self.bos, self.eos, self.pad = src_dict.bos(), src_dict.eos(), src_dict.pad()
        self.bos_item, self.eos_item = (torch.tensor([index]) for index in (self.bos, self.eos))
        self.patch_transform = PatchImageTransform.for_task(
            patch_image_size, imagenet_default_mean_and_std
        )
        # Rows whose image was truncated, by sample id, until the collater puts them in their batch.
        # Kept in the process that loads the samples (a data-loader worker collates what it loads).
        self._truncated_images: Dict[str, List[str]] = {}
        self._empty_texts: set = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def encode_text(self, text: str) -> torch.LongTensor:
        """Dictionary ids of ``text`` (no bos/eos)."""
        return encode_text(text, self.bpe, self.tgt_dict)

    def load_patch_image(self, image_base64: str, row_id: str, index: int) -> torch.Tensor:
        """Preprocessed image tensor of row ``index`` (whose id column is ``row_id``)."""
        where = f"{row_id} ({self.dataset.path}, line {self.dataset.line_number(index)})"
        truncated: List[str] = []
        image = decode_base64_image(image_base64, where, strict=self.strict_images, truncated=truncated)
        if truncated:
            self._truncated_images[str(row_id)] = truncated
        return self.patch_transform(image)

    def warn_empty_text(self, what: str, row_id, index: int) -> None:
        """Log once per row that its `what` (a caption, a hypothesis) is empty after cleaning."""
        key = (what, str(row_id))
        if key not in self._empty_texts:
            self._empty_texts.add(key)
            logger.warning("row %s (%s, line %d): empty %s; the sample trains on eos alone (%d such rows so far)",
                           row_id, self.dataset.path, self.dataset.line_number(index), what, len(self._empty_texts))

    def ordered_indices(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        return self.collate_samples(samples)

    def collate_samples(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """OFA's batch of `samples` with this dataset's padding and its truncated-image notes;
        subclasses add their task's fields to it."""
        return self.with_truncated_images(collate_ofa_samples(samples, pad_idx=self.pad, eos_idx=self.eos), samples)

    def with_truncated_images(self, batch: Dict[str, Any], samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Add ``truncated_images`` (descriptions of the batch's rows whose image was truncated)."""
        if batch:
            batch["truncated_images"] = [
                note for sample in samples for note in self._truncated_images.pop(str(sample["id"]), [])
            ]
        return batch
