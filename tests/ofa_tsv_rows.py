"""Small OFA-format TSV files for tests: PNG images in base64 and rows rebuilt from the OFA fixtures."""
import base64
import io
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from ofa_fixtures import BPE_DIR

# Premise/hypothesis/label of the snli_ve fixture rows (texts as in the fixture's src_text, with
# capitals and trailing punctuation that OFA's pre_caption must normalise).
SNLI_FIXTURE_TEXTS = [
    ("Two red boxes and a blue ball lie on a floor.", "There are two boxes in the picture.", "entailment"),
    ("A green circle on grey", "A dog is sleeping.", "contradiction"),
    ("Shapes over a gradient.", "the background is a gradient", "neutral"),
]


def png_base64(pixels) -> str:
    """urlsafe base64 of a PNG of an H x W x 3 uint8 array or tensor."""
    array = pixels.numpy() if torch.is_tensor(pixels) else np.asarray(pixels, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.urlsafe_b64encode(buffer.getvalue()).decode("ascii")


def solid_image_base64(height: int = 12, width: int = 16, color=(10, 120, 240)) -> str:
    return png_base64(np.full((height, width, 3), color, dtype=np.uint8))


def write_tsv(path: Path, rows: Sequence[Sequence[str]]) -> Path:
    path.write_text("".join("\t".join(str(field) for field in row) + "\n" for row in rows), encoding="utf-8")
    return path


def decode_reference_texts(tokens: torch.Tensor) -> List[str]:
    """BPE-decoded text of each row of a B x T token tensor (specials and pad dropped)."""
    from mue_fairseq.data.ofa_bpe import build_gpt2_bpe, decode_tokens, load_ofa_dictionary

    bpe = build_gpt2_bpe(str(BPE_DIR))
    dictionary = load_ofa_dictionary(str(BPE_DIR))
    return [decode_tokens(row.tolist(), bpe, dictionary) for row in tokens]


def caption_fixture_rows(reference: dict) -> List[List[str]]:
    """Caption rows (uniq-id, image-id, caption, objects, image) whose captions OFA turned into the fixture targets.

    The captions get a final period and a comma that OFA's cleaning must remove.
    """
    rows = []
    for uid, pixels, caption in zip(
        reference["ids"], reference["raw_images_uint8_hwc"], decode_reference_texts(reference["target"])
    ):
        words = caption.split()
        words[0] = words[0] + ","
        rows.append([str(uid), f"img{uid}", " ".join(words) + ".", "unused objects", png_base64(pixels)])
    return rows


def snli_fixture_rows(reference: dict) -> List[List[str]]:
    """SNLI-VE rows (uniq-id, image-id, image, hypothesis, premise, label) of the fixture batch."""
    return [
        [str(uid), f"img{uid}", png_base64(pixels), hypothesis, premise, label]
        for uid, pixels, (premise, hypothesis, label) in zip(
            reference["ids"], reference["raw_images_uint8_hwc"], SNLI_FIXTURE_TEXTS
        )
    ]
