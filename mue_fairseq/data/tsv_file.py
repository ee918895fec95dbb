"""Random-access reader for OFA's tab-separated data files.

OFA stores every task as one TSV row per sample (ids, base64 images, texts) and
picks columns with ``--selected-cols``. OFA's own reader streams a per-rank
slice and ignores the requested index; this reader builds a byte-offset index
once and serves any row, so fairseq's batch sharding and shuffling work as for
any indexed dataset.
"""

import logging
import os
from typing import List, Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)


def parse_selected_cols(selected_cols: Union[None, str, Sequence[int]]) -> Optional[List[int]]:
    """Turn ``"0,4,2"`` (OFA's ``--selected-cols``) or a list of ints into a list of column indices."""
    if selected_cols is None:
        return None
    if isinstance(selected_cols, str):
        parts = [part.strip() for part in selected_cols.split(",") if part.strip()]
        try:
            columns = [int(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"--selected-cols must be comma-separated column indices, got {selected_cols!r}"
            ) from None
    else:
        columns = [int(col) for col in selected_cols]
    if not columns:
        raise ValueError(f"--selected-cols names no column: {selected_cols!r}")
    negative = [col for col in columns if col < 0]
    if negative:
        raise ValueError(f"--selected-cols has negative column index {negative[0]} ({selected_cols!r})")
    return columns


class TSVFile:
    """Rows of a TSV file by index, restricted to the selected columns (in the given order).

    Rows are lines; completely empty lines are skipped (and counted in the log).
    Every row is checked once, when the index is built, for having the selected
    columns, so a malformed file fails at start-up with its 1-based line number.
    """

    def __init__(
        self,
        path: str,
        selected_cols: Union[None, str, Sequence[int]] = None,
        separator: str = "\t",
    ):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} does not exist")
        self.path = path
        self.separator = separator
        self._separator_bytes = separator.encode("utf-8")
        self.selected_cols = parse_selected_cols(selected_cols)
        self._offsets, self._line_numbers, self.num_columns = self._build_index()
        if len(self) == 0:
            raise ValueError(f"data file {path} has no rows")
        if self.selected_cols is None:
            self.selected_cols = list(range(self.num_columns))
        self._needed_columns = max(self.selected_cols) + 1
        if self._needed_columns > self.num_columns:
            missing = max(self.selected_cols)
            raise ValueError(
                f"selected column {missing} does not exist in {path}: its first row has "
                f"{self.num_columns} columns (valid indices 0..{self.num_columns - 1})"
            )
        self._check_all_rows()
        self._handle = None
        self._handle_pid = None
        logger.info(
            "TSV %s: %d rows, %d columns, selected columns %s",
            path, len(self), self.num_columns, self.selected_cols,
        )

    def _build_index(self):
        offsets: List[int] = []
        line_numbers: List[int] = []
        column_counts: List[int] = []
        skipped = 0
        offset = 0
        with open(self.path, "rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if line.strip(b"\r\n") == b"":
                    skipped += 1
                else:
                    offsets.append(offset)
                    line_numbers.append(line_number)
                    column_counts.append(line.count(self._separator_bytes) + 1)
                offset += len(line)
        if skipped:
            logger.warning("%s: skipped %d empty line(s)", self.path, skipped)
        self._column_counts = np.asarray(column_counts, dtype=np.int64)
        num_columns = int(self._column_counts[0]) if column_counts else 0
        return (
            np.asarray(offsets, dtype=np.int64),
            np.asarray(line_numbers, dtype=np.int64),
            num_columns,
        )

    def _check_all_rows(self) -> None:
        short = np.nonzero(self._column_counts < self._needed_columns)[0]
        if len(short) > 0:
            row = int(short[0])
            raise ValueError(self._short_row_message(row, int(self._column_counts[row])))
        del self._column_counts

    def _short_row_message(self, row: int, found: int) -> str:
        return (
            f"{self.path}, line {int(self._line_numbers[row])}: row has {found} column(s), "
            f"but --selected-cols {self.selected_cols} needs at least {self._needed_columns}"
        )

    def __len__(self) -> int:
        return len(self._offsets)

    def line_number(self, index: int) -> int:
        """1-based line number in the file of row ``index``."""
        return int(self._line_numbers[index])

    def _reader(self):
        # One handle per process: DataLoader workers fork and must not share a file position.
        pid = os.getpid()
        if self._handle is None or self._handle_pid != pid:
            self._handle = open(self.path, "rb")
            self._handle_pid = pid
        return self._handle

    def __getitem__(self, index: int) -> List[str]:
        if index < 0 or index >= len(self):
            raise IndexError(f"row {index} out of range for {self.path} ({len(self)} rows)")
        handle = self._reader()
        handle.seek(int(self._offsets[index]))
        line = handle.readline().decode("utf-8").rstrip("\r\n")
        fields = line.split(self.separator)
        if len(fields) < self._needed_columns:
            raise ValueError(self._short_row_message(index, len(fields)))
        return [fields[col] for col in self.selected_cols]

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()
