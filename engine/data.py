"""Loading datasets from JSONL, CSV and TSV into `Example`s, with errors that name the place.

Each row becomes ``Example(inputs, expected, id)``.  A JSONL row may carry the shape
directly (``{"inputs": {...}, "expected": ..., "id": ...}``); otherwise, and for CSV, a
`ColumnMap` says which columns are inputs, which is the expected answer and which the
id.  Every problem raises `DataError` naming ``file:line`` and the field, before any
call is made.  An expected answer is required: a missing or ``null`` one (an empty
cell in CSV) is an error, never scored against the text ``null``.  Files may start with
a UTF-8 byte-order mark.  `load_splits` loads a train and a validation file and refuses
an id that names different inputs in the two (predictions are cached by id).
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError, DataError
from ._types import Example

__all__ = [
    "ColumnMap",
    "load_csv",
    "load_dataset",
    "load_jsonl",
    "load_splits",
    "parse_jsonl_row",
    "row_location",
]

_Rows = Iterator[tuple[str, Mapping[str, Any]]]


@dataclass(frozen=True, kw_only=True, slots=True)
class ColumnMap:
    """Which columns of a row are the inputs, the expected answer and the id.

    Parameters:
        inputs: input column names; ``None`` means every column but the others; a
            single string is one column (never split into characters).
        expected: the expected-answer column.
        id: the id column, or ``None`` for content-hash ids.
        metadata: columns kept as metadata (not shown to the model).
    """

    inputs: Sequence[str] | None = None
    expected: str = "expected"
    id: str | None = "id"
    metadata: Sequence[str] = ()

    def __post_init__(self) -> None:
        # a str is a Sequence[str] too: "question" must not become q, u, e, ...
        if self.inputs is not None:
            inputs = (self.inputs,) if isinstance(self.inputs, str) else tuple(self.inputs)
            object.__setattr__(self, "inputs", inputs)
        metadata = (self.metadata,) if isinstance(self.metadata, str) else tuple(self.metadata)
        object.__setattr__(self, "metadata", metadata)


def _row_to_example(
    row: Mapping[str, Any], columns: ColumnMap, where: str, *, text_cells: bool = False
) -> Example:
    if "inputs" in row and isinstance(row["inputs"], Mapping) and columns.inputs is None:
        inputs = dict(row["inputs"])
    else:
        reserved = {columns.expected, *(columns.metadata or ())}
        if columns.id is not None:
            reserved.add(columns.id)
        names = (
            list(columns.inputs)
            if columns.inputs is not None
            else [k for k in row if k not in reserved]
        )
        missing = [n for n in names if n not in row]
        if missing:
            raise DataError(f"missing input column(s) {missing}", location=where)
        inputs = {n: row[n] for n in names}
    if not inputs:
        raise DataError("the row has no input fields", location=where)
    _check_expected(row, columns.expected, where, text_cells=text_cells)
    raw_id = row.get(columns.id) if columns.id is not None else None
    if raw_id is not None and not isinstance(raw_id, str | int):
        raise DataError(f"field {columns.id!r} must be a string or integer id", location=where)
    if raw_id is not None and str(raw_id).strip() == "":
        raise DataError(f"field {columns.id!r} is empty", location=where)
    try:
        return Example(
            inputs,
            row[columns.expected],
            id=str(raw_id) if raw_id is not None else "",
            metadata={m: row.get(m) for m in columns.metadata},
        )
    except ConfigError as exc:
        raise DataError(exc.message, location=where) from exc


def _check_expected(row: Mapping[str, Any], name: str, where: str, *, text_cells: bool) -> None:
    if name not in row:
        raise DataError(f"missing field {name!r} (the expected answer)", location=where)
    if row[name] is None:
        raise DataError(
            f"field {name!r} (the expected answer) is null; every row needs one", location=where
        )
    # A CSV cell cannot say null: an empty expected cell is a missing answer (inputs
    # may be empty text).  JSONL can say "" on purpose.
    if text_cells and row[name] == "":
        raise DataError(
            f"field {name!r} (the expected answer) is empty; every row needs one", location=where
        )


def _check_ids(examples: list[Example], locations: list[str]) -> None:
    seen: dict[str, str] = {}
    for example, where in zip(examples, locations, strict=True):
        if example.id in seen:
            raise DataError(
                f"duplicate id {example.id!r} (first at {seen[example.id]})", location=where
            )
        seen[example.id] = where


def _iter_jsonl(path: Path) -> _Rows:
    # utf-8-sig: a byte-order mark (some editors write one) is not part of the data
    with path.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            where = f"{path}:{number}"
            row = parse_jsonl_row(line, where)
            if row is not None:
                yield where, row


def parse_jsonl_row(line: str, where: str) -> Mapping[str, Any] | None:
    """One JSONL line as a row (``None`` for a blank line); `DataError` naming
    ``where`` when it is not a JSON object."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except ValueError as exc:
        raise DataError(f"not valid JSON ({exc.args[0]})", location=where) from None
    if not isinstance(row, dict):
        raise DataError(f"a row must be a JSON object, got {type(row).__name__}", location=where)
    return row


def _iter_csv(path: Path, delimiter: str = ",") -> _Rows:
    # utf-8-sig: with a byte-order mark the first column would be "\ufeffid"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError("the row has more cells than the header", location=where)
            short = [name for name, cell in row.items() if cell is None]
            if short:
                raise DataError(
                    f"the row has fewer cells than the header (no {short[0]!r})", location=where
                )
            yield where, row


def _load(
    rows: _Rows, columns: ColumnMap, path: Path, *, text_cells: bool = False
) -> tuple[list[Example], list[str]]:
    examples: list[Example] = []
    locations: list[str] = []
    for where, row in rows:
        examples.append(_row_to_example(row, columns, where, text_cells=text_cells))
        locations.append(where)
    if not examples:
        raise DataError("the dataset is empty", location=str(path))
    _check_ids(examples, locations)
    return examples, locations


def _open_checked(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", location=str(p))
    if not p.is_file():
        # a FIFO would block the run forever on its first read; name what it is
        raise DataError(f"not a regular file (it is {_file_kind(p)})", location=str(p))
    if not os.access(p, os.R_OK):
        raise DataError("the file is not readable", location=str(p))
    return p


def _file_kind(p: Path) -> str:
    mode = p.stat().st_mode
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read(
    p: Path, rows: _Rows, columns: ColumnMap | None, *, text_cells: bool
) -> tuple[list[Example], list[str]]:
    """Every row of ``p`` as an `Example`, with its ``file:line``."""
    try:
        return _load(rows, columns or ColumnMap(), p, text_cells=text_cells)
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", location=str(p)) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", location=str(p)) from None


def load_jsonl(path: str | os.PathLike[str], columns: ColumnMap | None = None) -> list[Example]:
    """Load a JSONL file (one JSON object per line)."""
    p = _open_checked(path)
    return _read(p, _iter_jsonl(p), columns, text_cells=False)[0]


def load_csv(
    path: str | os.PathLike[str], columns: ColumnMap | None = None, *, delimiter: str = ","
) -> list[Example]:
    """Load a CSV file with a header row (``delimiter="\\t"`` for TSV); cells are strings."""
    p = _open_checked(path)
    return _read(p, _iter_csv(p, delimiter), columns, text_cells=True)[0]


def _rows(path: str | os.PathLike[str]) -> tuple[_Rows, bool]:
    """The row iterator for ``path`` by its suffix, and whether its cells are text."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return _iter_jsonl(p), False
    if suffix in {".csv", ".tsv"}:
        return _iter_csv(p, "\t" if suffix == ".tsv" else ","), True
    raise DataError(
        f"unknown dataset format {suffix!r}; use .jsonl, .csv or .tsv", location=str(path)
    )


def _load_located(
    path: str | os.PathLike[str], columns: ColumnMap | None
) -> tuple[list[Example], list[str]]:
    rows, text_cells = _rows(path)
    return _read(_open_checked(path), rows, columns, text_cells=text_cells)


def load_dataset(path: str | os.PathLike[str], columns: ColumnMap | None = None) -> list[Example]:
    """Load JSONL (``.jsonl``, ``.ndjson``), CSV (``.csv``) or TSV (``.tsv``) by suffix."""
    return _load_located(path, columns)[0]


def load_splits(
    train: str | os.PathLike[str],
    val: str | os.PathLike[str] | None,
    columns: ColumnMap | None = None,
) -> tuple[list[Example], list[Example] | None]:
    """Load a training and an optional validation file.

    An id in both with different inputs is a `DataError` naming both rows: the cache
    keys predictions by id, so one id must mean one question in every split.
    """
    train_rows, train_where = _load_located(train, columns)
    if val is None:
        return train_rows, None
    val_rows, val_where = _load_located(val, columns)
    first = {e.id: (e, w) for e, w in zip(train_rows, train_where, strict=True)}
    for example, where in zip(val_rows, val_where, strict=True):
        seen = first.get(example.id)
        if seen is not None and seen[0].inputs_hash != example.inputs_hash:
            raise DataError(
                f"id {example.id!r} is also in the training set ({seen[1]}) with different "
                "inputs; an id must name the same example in every split",
                location=where,
            )
    return train_rows, val_rows


def row_location(path: str | os.PathLike[str], index: int) -> str | None:
    """``file:line`` of the row at ``index`` (0-based, blank lines skipped), or ``None``."""
    try:
        rows, _ = _rows(path)
        for number, (where, _row) in enumerate(rows):
            if number == index:
                return where
    except (OSError, ValueError, csv.Error):
        return None
    return None
