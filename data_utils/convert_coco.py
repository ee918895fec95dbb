"""Convert COCO captions (Karpathy split) into OFA's caption TSVs and COCO-format reference JSONs.

Input: Karpathy's ``dataset_coco.json`` (``images[]`` with ``filepath``, ``filename``, ``cocoid``,
``split`` in train/restval/val/test, ``sentences[].raw``, optional ``sentids``) and the COCO image
folder (``<image-root>/<filepath>/<filename>``).

Output, in OFA's column order ``uniq-id, image-id, caption, predicted-object-labels, image-base64``:

* ``caption_stage1_train.tsv``: train + restval, one caption per row (uniq-id = sentence id);
* ``caption_val.tsv`` / ``caption_test.tsv``: one row per image, references joined with ``&&``
  (uniq-id = image-id = cocoid), as OFA reads them with ``--selected-cols 1,4,2``;
* optionally ``caption_stage2_train.tsv``: train + restval in the per-image form (for SCST);
* ``caption_{val,test}_coco_format.json``: references for :mod:`mue_fairseq.metrics.caption_scores`;
* ``cider_cached_tokens/coco-{train,valid}-words.p``: CIDEr-D document frequencies of the train and
  val references in OFA's pickle layout (``--scst-cider-cached-tokens`` / ``--eval-cider-cached-tokens``;
  the train references end with the word ``<eos>``, as SCST scores them);
* ``conversion_report.json``: rows written and every bad row (file, entry, reason).

The predicted-object-labels column is left empty (OFA does not read it).

Usage: ``python -m data_utils.convert_coco --karpathy-json dataset_coco.json --image-root COCO --out-dir OUT``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Optional

from data_utils.conversion import (
    ON_BAD_ROW_CHOICES,
    ConversionReport,
    clean_text,
    encode_image_file,
    write_tsv_row,
)

logger = logging.getLogger(__name__)

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
OUTPUT_SPLITS = ("train", "val", "test")
LOG_EVERY = 5000


def _coco_reference(images: list[dict], annotations: list[dict], split: str) -> dict:
    return {
        "info": {"description": f"COCO captions, Karpathy {split} split"},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def _image_captions(entry: dict, source: str, location: str, report: ConversionReport) -> list[tuple[int, str]]:
    """(sentence id, cleaned caption) pairs of one Karpathy entry; bad sentences are reported."""
    sentences = entry.get("sentences")
    if not isinstance(sentences, list):
        report.bad(source, location, "missing field: 'sentences'")
        return []
    sentids = entry.get("sentids")
    captions = []
    for j, sentence in enumerate(sentences):
        where = f"{location}.sentences[{j}]"
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str):
            report.bad(source, where, "missing field: 'raw'")
            continue
        caption = clean_text(raw)
        if not caption:
            report.bad(source, where, "empty caption")
            continue
        if "&&" in caption:
            report.bad(source, where, f"caption contains the reference separator '&&': {caption!r}")
            continue
        if isinstance(sentence.get("sentid"), int):
            sentid = sentence["sentid"]
        elif isinstance(sentids, list) and j < len(sentids):
            sentid = sentids[j]
        else:
            report.bad(source, where, "missing field: 'sentid'")
            continue
        captions.append((int(sentid), caption))
    return captions


def convert_coco(
    karpathy_json: str,
    image_root: str,
    out_dir: str,
    splits: tuple[str, ...] = OUTPUT_SPLITS,
    on_bad_row: str = "fail",
    max_side: Optional[int] = None,
    stage2_train: bool = False,
    limit: Optional[int] = None,
) -> ConversionReport:
    """Convert the Karpathy-split COCO captions; see the module docstring for the files written.

    Args:
        splits: output splits to write (train = Karpathy train + restval).
        on_bad_row: "fail" raises on the first bad entry, "skip" reports and skips it.
        max_side: downscale images larger than this (re-encoded as JPEG); None keeps the files.
        stage2_train: also write the per-image train TSV used by SCST.
        limit: convert at most this many images per split (for quick trials).
    """
    report = ConversionReport(on_bad_row=on_bad_row)
    unknown = set(splits) - set(OUTPUT_SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {OUTPUT_SPLITS}")
    with open(karpathy_json, encoding="utf-8") as f:
        try:
            dataset = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{karpathy_json}: not valid JSON ({e})") from e
    entries = dataset.get("images") if isinstance(dataset, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{karpathy_json}: expected a JSON object with an 'images' list (Karpathy format)")
    os.makedirs(out_dir, exist_ok=True)

    files = {}
    names = {
        "train": "caption_stage1_train.tsv",
        "train_stage2": "caption_stage2_train.tsv",
        "val": "caption_val.tsv",
        "test": "caption_test.tsv",
    }
    wanted = [s for s in splits] + (["train_stage2"] if stage2_train and "train" in splits else [])
    for key in wanted:
        files[key] = open(os.path.join(out_dir, names[key]), "w", encoding="utf-8", newline="\n")
    references = {s: ([], []) for s in splits if s != "train"}
    cider_refs: dict[str, dict[int, list[str]]] = {s: {} for s in ("train", "val") if s in splits}
    converted = {s: 0 for s in splits}
    try:
        for i, entry in enumerate(entries):
            location = f"images[{i}]"
            if not isinstance(entry, dict):
                report.bad(karpathy_json, location, "malformed entry: not a JSON object")
                continue
            missing = [k for k in ("filepath", "filename", "cocoid", "split") if k not in entry]
            if missing:
                report.bad(karpathy_json, location, f"missing field: {missing}")
                continue
            if entry["split"] not in KARPATHY_SPLITS:
                report.bad(karpathy_json, location, f"unknown split: {entry['split']!r}")
                continue
            split = KARPATHY_SPLITS[entry["split"]]
            if split not in splits or (limit is not None and converted[split] >= limit):
                continue
            captions = _image_captions(entry, karpathy_json, location, report)
            if not captions:
                report.bad(karpathy_json, location, "no usable captions")
                continue
            image_path = os.path.join(image_root, entry["filepath"], entry["filename"])
            try:
                image_b64 = encode_image_file(image_path, max_side)
            except FileNotFoundError:
                report.bad(karpathy_json, location, f"missing image: {image_path}")
                continue
            except OSError as e:
                report.bad(karpathy_json, location, str(e))
                continue
            image_id = int(entry["cocoid"])
            if split in cider_refs:
                cider_refs[split][image_id] = [c for _, c in captions]
            if split == "train":
                for sentid, caption in captions:
                    write_tsv_row(files["train"], [sentid, image_id, caption, "", image_b64])
                    report.count_written(names["train"])
                if "train_stage2" in files:
                    joined = "&&".join(c for _, c in captions)
                    write_tsv_row(files["train_stage2"], [image_id, image_id, joined, "", image_b64])
                    report.count_written(names["train_stage2"])
            else:
                joined = "&&".join(c for _, c in captions)
                write_tsv_row(files[split], [image_id, image_id, joined, "", image_b64])
                report.count_written(names[split])
                images, annotations = references[split]
                images.append({"id": image_id, "file_name": entry["filename"]})
                annotations.extend({"image_id": image_id, "id": sid, "caption": c} for sid, c in captions)
            converted[split] += 1
            if sum(converted.values()) % LOG_EVERY == 0:
                logger.info("converted %d images (%s)", sum(converted.values()), converted)
    finally:
        for f in files.values():
            f.close()

    for split, (images, annotations) in references.items():
        path = os.path.join(out_dir, f"caption_{split}_coco_format.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_coco_reference(images, annotations, split), f)
        logger.info("wrote %d reference captions of %d images to %s", len(annotations), len(images), path)
    _save_cider_cached_tokens(cider_refs, out_dir)
    report.save(os.path.join(out_dir, "conversion_report.json"))
    report.log_summary()
    return report


def _save_cider_cached_tokens(refs: dict[str, dict[int, list[str]]], out_dir: str) -> None:
    from mue_fairseq.metrics.cider import CIDER_EOS, save_document_frequency

    for split, name in (("train", "train"), ("val", "valid")):
        if refs.get(split):
            path = os.path.join(out_dir, "cider_cached_tokens", f"coco-{name}-words.p")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_document_frequency(refs[split], path, end_word=CIDER_EOS if split == "train" else None)
            logger.info("wrote CIDEr-D document frequencies of %d %s images to %s", len(refs[split]), split, path)


def cli_main(argv: list[str] | None = None) -> ConversionReport:
    parser = argparse.ArgumentParser(description="COCO captions (Karpathy split) -> OFA caption TSVs")
    parser.add_argument("--karpathy-json", required=True, help="Karpathy's dataset_coco.json")
    parser.add_argument("--image-root", required=True, help="folder holding <filepath>/<filename> images")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--splits", nargs="+", default=list(OUTPUT_SPLITS), choices=OUTPUT_SPLITS)
    parser.add_argument("--on-bad-row", default="fail", choices=ON_BAD_ROW_CHOICES,
                        help="fail on the first bad entry, or skip it and list it in the report")
    parser.add_argument("--max-side", type=int, default=None,
                        help="downscale images whose longer side exceeds this (re-encoded as JPEG)")
    parser.add_argument("--stage2-train", action="store_true",
                        help="also write caption_stage2_train.tsv (one row per image, for SCST)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    args = parser.parse_args(argv)
    return convert_coco(
        args.karpathy_json, args.image_root, args.out_dir, tuple(args.splits), args.on_bad_row,
        args.max_side, args.stage2_train, args.limit,
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
