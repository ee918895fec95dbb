"""Convert RefCOCO / RefCOCO+ / RefCOCOg (the refer toolkit's files) into OFA's ``refcoco`` TSVs.

Input: the refer toolkit's ``refs(unc).p`` (refcoco, refcoco+) or ``refs(umd).p`` / ``refs(google).p``
(refcocog): a pickled list of refs with ``ref_id``, ``ann_id``, ``image_id``, ``split`` and
``sentences[]`` (``sent_id``, ``sent``); the dataset's ``instances.json`` (COCO ``images[]`` with
``id`` and ``file_name``, ``annotations[]`` with ``id`` and ``bbox`` = [x, y, width, height]); and the
COCO train2014 image folder (``<image-root>/<file_name>``).

Output ``<name>_<split>.tsv`` (``refcoco``, ``refcocoplus``, ``refcocog``), one row per referring
sentence, in OFA's column order ``uniq-id, image-id, text, region-coord, image-base64`` (OFA reads it
with ``--selected-cols 0,4,2,3``): uniq-id is the sentence's ``sent_id``, region-coord the annotation's
box as ``x0,y0,x1,y1`` in pixels. Splits: refcoco and refcoco+ have train / val / testA / testB,
refcocog train / val / test (umd; google's has no test).

Bad rows (``--on-bad-row``), named by file and ref / sentence id in ``conversion_report.json``: a ref
of an unknown split, a ref whose annotation or image entry is missing, a missing or unreadable image
file, a box outside the image (beyond ``--box-tolerance`` pixels, which absorbs COCO's rounding: boxes
within it are clipped to the image) or of zero area, an empty sentence.

Usage: ``python -m data_utils.convert_refcoco --dataset refcoco --refs refcoco/refs(unc).p
--instances refcoco/instances.json --image-root train2014 --out-dir OUT``
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import pickle
from typing import Optional

from PIL import Image

from data_utils.conversion import (
    ON_BAD_ROW_CHOICES,
    ConversionReport,
    clean_text,
    encode_image_file,
    write_tsv_row,
)

logger = logging.getLogger(__name__)

# dataset -> (output name prefix, splits)
DATASETS = {
    "refcoco": ("refcoco", ("train", "val", "testA", "testB")),
    "refcoco+": ("refcocoplus", ("train", "val", "testA", "testB")),
    "refcocog": ("refcocog", ("train", "val", "test")),
}
DEFAULT_BOX_TOLERANCE = 1.0
LOG_EVERY = 20000


def format_box(box: tuple[float, float, float, float]) -> str:
    """OFA's region column: ``x0,y0,x1,y1`` rounded to hundredths of a pixel."""
    return ",".join(repr(round(float(v), 2)) for v in box)


def check_box(bbox, width: int, height: int, tolerance: float) -> tuple[Optional[tuple], str]:
    """(x0, y0, x1, y1) of a COCO ``[x, y, w, h]`` box inside a ``width`` x ``height`` image, or (None, why)."""
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)):
        return None, f"malformed box: {bbox!r} is not [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    x0, y0, x1, y1 = x, y, x + w, y + h
    if w <= 0 or h <= 0:
        return None, f"empty box: {bbox!r}"
    if x0 < -tolerance or y0 < -tolerance or x1 > width + tolerance or y1 > height + tolerance:
        return None, f"box outside the image: {format_box((x0, y0, x1, y1))} in a {width}x{height} image"
    return (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)), ""


def _load_refs(path: str) -> list:
    with open(path, "rb") as f:
        try:
            # the refer toolkit's pickles were written by Python 2
            refs = pickle.load(f, encoding="latin1")
        except Exception as e:  # unpickling raises many exception types
            raise ValueError(f"{path}: not a readable refs pickle ({e})") from e
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a pickled list of refs (refer toolkit format), got {type(refs).__name__}")
    return refs


def _load_instances(path: str) -> tuple[dict, dict]:
    with open(path, encoding="utf-8") as f:
        try:
            document = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not (isinstance(document, dict) and isinstance(document.get("images"), list)
            and isinstance(document.get("annotations"), list)):
        raise ValueError(f"{path}: expected a JSON object with 'images' and 'annotations' lists (COCO format)")
    images = {e["id"]: e for e in document["images"] if isinstance(e, dict) and "id" in e}
    annotations = {e["id"]: e for e in document["annotations"] if isinstance(e, dict) and "id" in e}
    return images, annotations


def convert_refcoco(
    refs_path: str,
    instances_json: str,
    image_root: str,
    out_dir: str,
    dataset: str = "refcoco",
    splits: Optional[tuple[str, ...]] = None,
    on_bad_row: str = "fail",
    box_tolerance: float = DEFAULT_BOX_TOLERANCE,
) -> ConversionReport:
    """Convert one RefCOCO-family dataset into ``<out_dir>/<name>_<split>.tsv``; see the module docstring.

    Args:
        splits: the splits to write (default: all of ``dataset``'s); refs of other known splits are
            passed over, refs of a split the dataset does not have are bad rows.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(DATASETS)}")
    prefix, known = DATASETS[dataset]
    splits = tuple(splits) if splits else known
    unknown = set(splits) - set(known)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)} for {dataset}; choose from {known}")
    report = ConversionReport(on_bad_row=on_bad_row)
    refs = _load_refs(refs_path)
    images, annotations = _load_instances(instances_json)
    os.makedirs(out_dir, exist_ok=True)

    @functools.lru_cache(maxsize=256)
    def image_data(image_path: str) -> tuple[str, tuple[int, int]]:
        # images are kept as they are: OFA quantises the region against the decoded image's size
        data = encode_image_file(image_path)
        with Image.open(image_path) as image:
            return data, image.size

    names = {s: f"{prefix}_{s}.tsv" for s in splits}
    files = {s: open(os.path.join(out_dir, names[s]), "w", encoding="utf-8", newline="\n") for s in splits}
    try:
        for i, ref in enumerate(refs):
            missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences")
                       if not isinstance(ref, dict) or k not in ref]
            if missing:
                report.bad(refs_path, f"refs[{i}]", f"missing field: {missing}")
                continue
            where = f"ref_id {ref['ref_id']}"
            split = ref["split"]
            if split not in known:
                report.bad(refs_path, where, f"unknown split: {split!r} (not one of {dataset}'s {known})")
                continue
            if split not in files:
                continue
            annotation = annotations.get(ref["ann_id"])
            if annotation is None:
                report.bad(refs_path, where, f"missing annotation: ann_id {ref['ann_id']} not in {instances_json}")
                continue
            entry = images.get(ref["image_id"])
            if entry is None or "file_name" not in entry:
                report.bad(refs_path, where, f"missing image: image_id {ref['image_id']} not in {instances_json}")
                continue
            image_path = os.path.join(image_root, entry["file_name"])
            try:
                image_b64, (width, height) = image_data(image_path)
            except FileNotFoundError:
                report.bad(refs_path, where, f"missing image: {image_path}")
                continue
            except OSError as e:
                report.bad(refs_path, where, str(e))
                continue
            box, why = check_box(annotation.get("bbox"), width, height, box_tolerance)
            if box is None:
                report.bad(refs_path, f"{where} (ann_id {ref['ann_id']})", why)
                continue
            region = format_box(box)
            for j, sentence in enumerate(ref["sentences"] if isinstance(ref["sentences"], list) else []):
                text = clean_text(str(sentence.get("sent", ""))) if isinstance(sentence, dict) else ""
                sent_id = sentence.get("sent_id") if isinstance(sentence, dict) else None
                if not text or not isinstance(sent_id, int):
                    report.bad(refs_path, f"{where}.sentences[{j}]", "missing field: empty 'sent' or no 'sent_id'")
                    continue
                write_tsv_row(files[split], [sent_id, ref["image_id"], text, region, image_b64])
                report.count_written(names[split])
            if (i + 1) % LOG_EVERY == 0:
                logger.info("%d of %d refs converted", i + 1, len(refs))
    finally:
        for f in files.values():
            f.close()
    report.save(os.path.join(out_dir, "conversion_report.json"))
    report.log_summary()
    return report


def cli_main(argv: list[str] | None = None) -> ConversionReport:
    parser = argparse.ArgumentParser(description="RefCOCO/RefCOCO+/RefCOCOg (refer toolkit) -> OFA refcoco TSVs")
    parser.add_argument("--dataset", default="refcoco", choices=sorted(DATASETS))
    parser.add_argument("--refs", required=True, help="the refer toolkit's refs(unc).p / refs(umd).p")
    parser.add_argument("--instances", required=True, help="the dataset's instances.json")
    parser.add_argument("--image-root", required=True, help="COCO train2014 image folder")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--splits", nargs="+", default=None, help="splits to write (default: all of the dataset's)")
    parser.add_argument("--on-bad-row", default="fail", choices=ON_BAD_ROW_CHOICES,
                        help="fail on the first bad ref, or skip it and list it in the report")
    parser.add_argument("--box-tolerance", type=float, default=DEFAULT_BOX_TOLERANCE,
                        help="pixels a box may exceed the image by (it is clipped); more is a bad row")
    args = parser.parse_args(argv)
    return convert_refcoco(
        args.refs, args.instances, args.image_root, args.out_dir, args.dataset,
        tuple(args.splits) if args.splits else None, args.on_bad_row, args.box_tolerance,
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
