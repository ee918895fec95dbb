"""Shared pieces of the dataset converters: bad-row bookkeeping, image encoding, TSV text cleaning.

A converter never drops input silently: every row it cannot convert becomes a :class:`BadRow`
(source file, line or entry, reason). With ``on_bad_row="fail"`` the first one raises
:class:`BadRowError`; with ``"skip"`` it is logged, counted and listed in the conversion report.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Optional

from PIL import Image

logger = logging.getLogger(__name__)

ON_BAD_ROW_CHOICES = ("fail", "skip")
# Bad rows logged one by one before the log only counts them (all are in the report file).
MAX_LOGGED_BAD_ROWS = 50


class BadRowError(ValueError):
    """Raised for a bad input row when the converter runs with ``on_bad_row="fail"``."""


@dataclass(frozen=True)
class BadRow:
    source: str  # input file
    location: str  # "line 12" for line-based files, "images[3]" for JSON documents
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.location}: {self.reason}"


@dataclass
class ConversionReport:
    """What a converter wrote and what it could not convert."""

    on_bad_row: str = "fail"
    rows_written: dict[str, int] = field(default_factory=dict)
    bad_rows: list[BadRow] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.on_bad_row not in ON_BAD_ROW_CHOICES:
            raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {self.on_bad_row!r}")

    def bad(self, source: str, location: str, reason: str) -> None:
        """Record a bad row; raises in "fail" mode."""
        row = BadRow(source, location, reason)
        if self.on_bad_row == "fail":
            raise BadRowError(f"{row} (run with --on-bad-row skip to skip and report such rows)")
        self.bad_rows.append(row)
        if len(self.bad_rows) <= MAX_LOGGED_BAD_ROWS:
            logger.warning("skipping bad row: %s", row)
        elif len(self.bad_rows) == MAX_LOGGED_BAD_ROWS + 1:
            logger.warning("more bad rows; only counting from now on (all are listed in the report)")

    def count_written(self, output: str, n: int = 1) -> None:
        self.rows_written[output] = self.rows_written.get(output, 0) + n

    def bad_counts(self) -> dict[str, int]:
        """Number of bad rows per reason (with file-specific details stripped)."""
        return dict(Counter(r.reason.split(":")[0] for r in self.bad_rows))

    def log_summary(self) -> None:
        for output, n in sorted(self.rows_written.items()):
            logger.info("wrote %d rows to %s", n, output)
        if self.bad_rows:
            logger.warning(
                "%d bad rows skipped: %s",
                len(self.bad_rows),
                ", ".join(f"{k}: {v}" for k, v in sorted(self.bad_counts().items())),
            )
        else:
            logger.info("no bad rows")

    def save(self, path: str) -> None:
        payload = {
            "on_bad_row": self.on_bad_row,
            "rows_written": self.rows_written,
            "num_bad_rows": len(self.bad_rows),
            "bad_row_counts": self.bad_counts(),
            "bad_rows": [asdict(r) for r in self.bad_rows],
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, sort_keys=True)


def clean_text(text: str) -> str:
    """Collapse all whitespace (tabs and newlines included, which would break a TSV) to single spaces."""
    return " ".join(text.split())


def encode_image_file(path: str, max_side: Optional[int] = None) -> str:
    """Base64 (standard alphabet, as OFA's TSVs) of an image file.

    The file is checked to be a readable image. Without ``max_side`` its bytes are stored unchanged;
    with it, images whose longer side exceeds ``max_side`` are downscaled (bicubic, aspect kept) and
    re-encoded as JPEG quality 95, which keeps large-image TSVs small.

    Raises:
        FileNotFoundError: no such file.
        OSError: not a readable image.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        if max_side is not None:
            with Image.open(io.BytesIO(data)) as image:
                if max(image.size) > max_side:
                    image = image.convert("RGB")
                    image.thumbnail((max_side, max_side), Image.BICUBIC)
                    buf = io.BytesIO()
                    image.save(buf, format="JPEG", quality=95)
                    data = buf.getvalue()
    except Exception as e:  # PIL raises many exception types for damaged files
        raise OSError(f"unreadable image: {path} ({e})") from e
    return base64.b64encode(data).decode("ascii")


def write_tsv_row(f, values: list) -> None:
    """Write one TSV row; refuses values containing tabs or newlines."""
    cells = [str(v) for v in values]
    for cell in cells:
        if "\t" in cell or "\n" in cell or "\r" in cell:
            raise ValueError(f"TSV cell contains a tab or newline: {cell[:80]!r}")
    f.write("\t".join(cells) + "\n")
