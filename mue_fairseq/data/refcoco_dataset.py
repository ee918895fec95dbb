"""Visual grounding (RefCOCO, RefCOCO+, RefCOCOg) samples in OFA's format.

Columns (``--selected-cols``, OFA's ``0,4,2,3``): id, base64 image, referring expression, region
``"x0,y0,x1,y1"`` in pixels of the image. The source asks which region the expression describes;
the target is the region's four ``<bin_i>`` location tokens (see `location_tokens`) and eos. A
batch also carries what scoring needs: each image's resize ratios and its reference box in pixels.
"""

from typing import Any, Dict, List

import torch

from mue_fairseq.data.image_transform import decode_base64_image
from mue_fairseq.data.location_tokens import check_box, parse_box, quantize_box, resize_ratios
from mue_fairseq.data.ofa_dataset import OFADataset, pre_caption


def refcoco_source_text(expression: str) -> str:
    """OFA's encoder prompt for a cleaned referring expression."""
    return f' which region does the text " {expression} " describe?'


class RefcocoDataset(OFADataset):
    columns = ("id", "image", "text", "region")

    def __init__(
        self,
        split: str,
        dataset,
        bpe,
        src_dict,
        tgt_dict,
        max_src_length: int = 80,
        patch_image_size: int = 512,
        imagenet_default_mean_and_std: bool = False,
        num_bins: int = 1000,
        max_image_size: int = 512,
    ):
        super().__init__(split, dataset, bpe, src_dict, tgt_dict, patch_image_size, imagenet_default_mean_and_std)
        self.max_src_length = max_src_length
        self.patch_image_size = patch_image_size
        self.num_bins = num_bins
        self.max_image_size = max_image_size

    def __getitem__(self, index: int) -> Dict[str, Any]:
        uniq_id, image_base64, text, region = self.dataset[index]
        where = f"row {uniq_id} ({self.dataset.path}, line {self.dataset.line_number(index)})"
        truncated: List[str] = []
        image = decode_base64_image(image_base64, where, strict=self.strict_images, truncated=truncated)
        if truncated:
            self._truncated_images[str(uniq_id)] = truncated
        width, height = image.size
        box = parse_box(region, where)
        check_box(box, width, height, where)
        bins = quantize_box(box, width, height, self.patch_image_size, self.max_image_size, self.num_bins)
        if min(bins) < 0 or max(bins) >= self.num_bins:
            raise ValueError(
                f"{where}: box {box} quantises to bins {bins}, outside 0..{self.num_bins - 1}: "
                f"--max-image-size {self.max_image_size} must be at least --patch-image-size {self.patch_image_size}"
            )
        src_item = self.encode_text(refcoco_source_text(pre_caption(text, self.max_src_length)))
        src_item = torch.cat([self.bos_item, src_item, self.eos_item])
        tgt_item = self.tgt_dict.encode_line(
            " ".join(f"<bin_{b}>" for b in bins), add_if_not_exist=False, append_eos=False
        ).long()
        w_ratio, h_ratio = resize_ratios(width, height, self.patch_image_size)
        return {
            "id": uniq_id,
            "source": src_item,
            "patch_image": self.patch_transform(image),
            "patch_mask": torch.tensor([True]),
            "target": torch.cat([tgt_item, self.eos_item]),
            "prev_output_tokens": torch.cat([self.bos_item, tgt_item]),
            "w_resize_ratio": w_ratio,
            "h_resize_ratio": h_ratio,
            "region_coord": torch.tensor(box),
        }

    def collater(self, samples: List[Dict[str, Any]], pad_to_length=None) -> Dict[str, Any]:
        batch = self.collate_samples(samples)
        if not batch:
            return batch
        batch["w_resize_ratios"] = torch.stack([s["w_resize_ratio"] for s in samples])
        batch["h_resize_ratios"] = torch.stack([s["h_resize_ratio"] for s in samples])
        batch["region_coords"] = torch.stack([s["region_coord"] for s in samples])
        return batch
