"""Convert SNLI-VE (jsonl + Flickr30k images) into OFA's SNLI-VE TSVs.

Input: ``snli_ve_{train,dev,test}.jsonl`` with ``Flickr30K_ID``, ``sentence1`` (premise caption),
``sentence2`` (hypothesis), ``gold_label`` (entailment/neutral/contradiction) and ``pairID`` per
line, and the Flickr30k image folder (``<image-root>/<Flickr30K_ID>.jpg``).

Output ``snli_ve_{split}.tsv`` in OFA's column order ``uniq-id, image-id, image-base64, hypothesis,
caption, label`` (OFA reads it with ``--selected-cols 0,2,3,4,5``), plus ``conversion_report.json``
listing every bad line (file, line, reason: invalid JSON, missing field, unknown label, missing or
unreadable image).

uniq-id is a running integer per output file by default (``--uniq-id index``; numeric ids are what
OFA-style collaters expect) or the dataset's ``pairID`` (``--uniq-id pair_id``).

Usage: ``python -m data_utils.convert_snli_ve --jsonl-dir SNLI_VE --image-root flickr30k_images --out-dir OUT``
"""

from __future__ import annotations

import argparse
import functools
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

SNLI_VE_LABELS = ("entailment", "neutral", "contradiction")
SNLI_VE_SPLITS = ("train", "dev", "test")
REQUIRED_FIELDS = ("Flickr30K_ID", "sentence1", "sentence2", "gold_label", "pairID")
UNIQ_ID_CHOICES = ("index", "pair_id")
LOG_EVERY = 50000


def convert_snli_ve_file(
    jsonl_path: str,
    image_root: str,
    out_path: str,
    report: ConversionReport,
    uniq_id: str = "index",
    max_side: Optional[int] = None,
    image_ext: str = ".jpg",
) -> int:
    """Convert one jsonl file into one TSV; returns the number of rows written."""
    if uniq_id not in UNIQ_ID_CHOICES:
        raise ValueError(f"uniq_id must be one of {UNIQ_ID_CHOICES}, got {uniq_id!r}")
    out_name = os.path.basename(out_path)

    @functools.lru_cache(maxsize=256)
    def image_base64(image_path: str) -> str:
        return encode_image_file(image_path, max_side)

    written = 0
    with open(jsonl_path, encoding="utf-8") as src, open(out_path, "w", encoding="utf-8", newline="\n") as out:
        for line_no, line in enumerate(src, 1):
            location = f"line {line_no}"
            if not line.strip():
                report.bad(jsonl_path, location, "empty line")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad(jsonl_path, location, f"invalid JSON: {e}")
                continue
            if not isinstance(record, dict):
                report.bad(jsonl_path, location, "invalid JSON: not an object")
                continue
            missing = [k for k in REQUIRED_FIELDS if record.get(k) in (None, "")]
            if missing:
                report.bad(jsonl_path, location, f"missing field: {missing}")
                continue
            label = str(record["gold_label"]).strip()
            if label not in SNLI_VE_LABELS:
                report.bad(jsonl_path, location, f"unknown label: {label!r}")
                continue
            premise, hypothesis = clean_text(str(record["sentence1"])), clean_text(str(record["sentence2"]))
            if not premise or not hypothesis:
                report.bad(jsonl_path, location, "missing field: empty sentence1 or sentence2")
                continue
            image_id = str(record["Flickr30K_ID"]).strip()
            image_path = os.path.join(image_root, image_id + image_ext)
            try:
                image_b64 = image_base64(image_path)
            except FileNotFoundError:
                report.bad(jsonl_path, location, f"missing image: {image_path}")
                continue
            except OSError as e:
                report.bad(jsonl_path, location, str(e))
                continue
            row_id = written if uniq_id == "index" else clean_text(str(record["pairID"]))
            write_tsv_row(out, [row_id, image_id, image_b64, hypothesis, premise, label])
            written += 1
            report.count_written(out_name)
            if written % LOG_EVERY == 0:
                logger.info("%s: %d rows written", out_name, written)
    return written


def convert_snli_ve(
    jsonl_dir: str,
    image_root: str,
    out_dir: str,
    splits: tuple[str, ...] = SNLI_VE_SPLITS,
    on_bad_row: str = "fail",
    uniq_id: str = "index",
    max_side: Optional[int] = None,
) -> ConversionReport:
    """Convert ``<jsonl_dir>/snli_ve_<split>.jsonl`` for each split into ``<out_dir>/snli_ve_<split>.tsv``."""
    report = ConversionReport(on_bad_row=on_bad_row)
    unknown = set(splits) - set(SNLI_VE_SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from {SNLI_VE_SPLITS}")
    inputs = {s: os.path.join(jsonl_dir, f"snli_ve_{s}.jsonl") for s in splits}
    absent = [p for p in inputs.values() if not os.path.isfile(p)]
    if absent:
        raise FileNotFoundError(f"SNLI-VE input files not found: {absent}")
    os.makedirs(out_dir, exist_ok=True)
    for split, path in inputs.items():
        out_path = os.path.join(out_dir, f"snli_ve_{split}.tsv")
        logger.info("converting %s -> %s", path, out_path)
        convert_snli_ve_file(path, image_root, out_path, report, uniq_id, max_side)
    report.save(os.path.join(out_dir, "conversion_report.json"))
    report.log_summary()
    return report


def cli_main(argv: list[str] | None = None) -> ConversionReport:
    parser = argparse.ArgumentParser(description="SNLI-VE jsonl + Flickr30k images -> OFA SNLI-VE TSVs")
    parser.add_argument("--jsonl-dir", required=True, help="folder with snli_ve_{train,dev,test}.jsonl")
    parser.add_argument("--image-root", required=True, help="Flickr30k image folder (<Flickr30K_ID>.jpg)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--splits", nargs="+", default=list(SNLI_VE_SPLITS), choices=SNLI_VE_SPLITS)
    parser.add_argument("--on-bad-row", default="fail", choices=ON_BAD_ROW_CHOICES,
                        help="fail on the first bad line, or skip it and list it in the report")
    parser.add_argument("--uniq-id", default="index", choices=UNIQ_ID_CHOICES,
                        help="first column: running integer per file, or the dataset's pairID")
    parser.add_argument("--max-side", type=int, default=None,
                        help="downscale images whose longer side exceeds this (re-encoded as JPEG)")
    args = parser.parse_args(argv)
    return convert_snli_ve(
        args.jsonl_dir, args.image_root, args.out_dir, tuple(args.splits), args.on_bad_row,
        args.uniq_id, args.max_side,
    )


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO)
    cli_main()
