"""OFA's location tokens: boxes quantised to ``<bin_i>`` tokens and decoded back to pixels.

OFA's visual grounding resizes the image to a ``patch_image_size`` square (width and height
scale separately), scales the box with the image, divides it by ``--max-image-size`` and
quantises each coordinate to ``round(c * (num_bins - 1))`` (torch's round: half to even).
A predicted box goes back the same way: ``bin / (num_bins - 1) * max_image_size``, then divided
by the resize ratios. The arithmetic is float32 torch, as in OFA, so boxes and bins match OFA's
to the bit. The ``<bin_i>`` tokens are the last ``num_bins`` entries of the dictionary.
"""

from typing import List, Sequence, Tuple

import torch

# A coordinate may lie this many pixels outside the image (annotation tools round); beyond it, an error.
BOX_TOLERANCE_PIXELS = 1.0


def resize_ratios(width: int, height: int, patch_image_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(width ratio, height ratio) of the resize to a ``patch_image_size`` square, float32 scalars."""
    size = torch.tensor(patch_image_size)
    return size / width, size / height


def check_box(box: Sequence[float], width: int, height: int, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``box`` (x0, y0, x1, y1) lies inside the image."""
    x0, y0, x1, y1 = box
    tolerance = BOX_TOLERANCE_PIXELS
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"{where}: box {list(box)} is empty or inverted (need x0 < x1 and y0 < y1)")
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        raise ValueError(f"{where}: box {list(box)} lies outside the {width}x{height} image")


def parse_box(text: str, where: str) -> List[float]:
    """The four numbers of OFA's region column ``"x0,y0,x1,y1"``."""
    parts = text.strip().split(",")
    try:
        box = [float(part) for part in parts]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"{where}: region {text!r} is not four comma-separated numbers x0,y0,x1,y1")
    return box


def quantize_box(
    box: Sequence[float], width: int, height: int, patch_image_size: int, max_image_size: int, num_bins: int
) -> List[int]:
    """Bin indices of ``box`` (pixels of a ``width`` x ``height`` image), as OFA's refcoco data computes them."""
    ratio_w, ratio_h = (float(patch_image_size) / float(width), float(patch_image_size) / float(height))
    scaled = torch.tensor([box], dtype=torch.float32) * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    normalised = scaled / max_image_size
    return [int(v) for v in (normalised[0] * (num_bins - 1)).round().tolist()]


def bin_offset(dictionary_size: int, num_bins: int) -> int:
    """Dictionary id of ``<bin_0>``: the bins are the dictionary's last ``num_bins`` entries."""
    return dictionary_size - num_bins


def bins_to_boxes(
    bins: torch.Tensor, w_resize_ratios: torch.Tensor, h_resize_ratios: torch.Tensor, num_bins: int,
    max_image_size: int,
) -> torch.Tensor:
    """B x 4 boxes in pixels of the original images from B x 4 bin indices (OFA's decoding, float32)."""
    boxes = bins / (num_bins - 1) * max_image_size
    boxes[:, ::2] /= w_resize_ratios.unsqueeze(1)
    boxes[:, 1::2] /= h_resize_ratios.unsqueeze(1)
    return boxes


def box_hits(predicted: torch.Tensor, reference: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1.0 where a predicted box overlaps its reference with IoU >= ``threshold``, else 0.0 (B x 4 inputs).

    OFA's Acc@0.5: IoU has 1e-6 added to the union, and boxes that do not overlap (intersection
    width or height <= 0) never count, whatever their signed "intersection area".
    """
    top_left = torch.max(predicted[:, :2], reference[:, :2])
    bottom_right = torch.min(predicted[:, 2:], reference[:, 2:])
    inter_w = bottom_right[:, 0] - top_left[:, 0]
    inter_h = bottom_right[:, 1] - top_left[:, 1]
    inter = inter_w * inter_h
    area_p = (predicted[:, 2] - predicted[:, 0]) * (predicted[:, 3] - predicted[:, 1])
    area_r = (reference[:, 2] - reference[:, 0]) * (reference[:, 3] - reference[:, 1])
    iou = inter / (area_p + area_r - inter + 1e-6)
    return ((iou >= threshold) & (inter_w > 0) & (inter_h > 0)).float()
