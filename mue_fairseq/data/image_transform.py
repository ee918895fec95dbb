"""OFA's image preprocessing, with PIL and torch only (torchvision is not a dependency).

OFA decodes each row's urlsafe base64 image, converts it to RGB, resizes it to a
square with PIL bicubic resampling (what torchvision's ``Resize`` does on a PIL
image), scales to [0, 1] in CHW order (``ToTensor``) and normalises per channel
(``Normalize``). The arithmetic below is the same, so the tensors match OFA's up
to differences between Pillow versions in the bicubic resampling itself.
"""

import base64
import binascii
import logging
from io import BytesIO
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

logger = logging.getLogger(__name__)

# OFA's datasets set these so the same rows load: truncated images are read as far as possible
# (decode_base64_image still names them) and very large images are not refused.
ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
OFA_DEFAULT_MEAN = (0.5, 0.5, 0.5)
OFA_DEFAULT_STD = (0.5, 0.5, 0.5)


def normalization_stats(imagenet_default_mean_and_std: bool) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) OFA uses: ImageNet statistics with ``--imagenet-default-mean-and-std``, else 0.5/0.5."""
    if imagenet_default_mean_and_std:
        return IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    return OFA_DEFAULT_MEAN, OFA_DEFAULT_STD


def decode_base64_image(data: str, row_id: Union[str, int], strict: bool = False,
                        truncated: Optional[List[str]] = None) -> Image.Image:
    """Decode one data-file image column (urlsafe base64) into an RGB PIL image.

    A truncated image (its data ends early) loads as far as the data goes, as in OFA, so outputs
    stay OFA's; it is logged with ``row_id`` and appended to ``truncated``; ``strict`` makes it an
    error instead. Raises ValueError naming ``row_id`` when the text is not base64 or not an image.
    """
    try:
        raw = base64.urlsafe_b64decode(data)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"row {row_id}: image column is not valid base64 ({err})") from err
    try:
        return _open_rgb(raw, tolerate_truncation=False)
    except OSError as err:
        if "truncated" not in str(err):
            raise _not_an_image(row_id, raw, err) from err
        if strict:
            raise ValueError(f"row {row_id}: image is truncated ({len(raw)} bytes; --strict-images)") from err
    except (UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise _not_an_image(row_id, raw, err) from err
    try:
        image = _open_rgb(raw, tolerate_truncation=True)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise _not_an_image(row_id, raw, err) from err
    logger.warning("row %s: image is truncated (%d bytes decoded); its missing part is filled, as OFA does",
                   row_id, len(raw))
    if truncated is not None:
        truncated.append(f"{row_id}: {len(raw)} bytes")
    return image


def _open_rgb(raw: bytes, tolerate_truncation: bool) -> Image.Image:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = tolerate_truncation
    try:
        with Image.open(BytesIO(raw)) as image:
            return image.convert("RGB")
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _not_an_image(row_id, raw: bytes, err: Exception) -> ValueError:
    return ValueError(f"row {row_id}: image column does not decode to an image ({len(raw)} bytes; {err})")


class PatchImageTransform:
    """RGB PIL image -> normalised float32 tensor of shape 3 x size x size."""

    def __init__(
        self,
        patch_image_size: int,
        mean: Sequence[float] = OFA_DEFAULT_MEAN,
        std: Sequence[float] = OFA_DEFAULT_STD,
    ):
        if patch_image_size <= 0:
            raise ValueError(f"patch_image_size must be positive, got {patch_image_size}")
        self.patch_image_size = patch_image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def for_task(cls, patch_image_size: int, imagenet_default_mean_and_std: bool) -> "PatchImageTransform":
        mean, std = normalization_stats(imagenet_default_mean_and_std)
        return cls(patch_image_size, mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        size = self.patch_image_size
        resized = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True))
        tensor = pixels.permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return tensor.sub_(self.mean).div_(self.std)
