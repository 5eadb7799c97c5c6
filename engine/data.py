"""Loading datasets from JSONL and CSV into `Example`s, with errors that name the place.

Each row becomes ``Example(inputs, expected, id)``.  A JSONL row may carry the shape
directly (``{"inputs": {...}, "expected": ..., "id": ...}``); otherwise, and for CSV, a
`ColumnMap` says which columns are inputs, which is the expected answer and which the
id.  Every problem raises `DataError` naming ``file:line`` and the field, before any
call is made.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError, DataError
from ._types import Example

__all__ = ["ColumnMap", "load_csv", "load_dataset", "load_jsonl"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ColumnMap:
    """Which columns of a row are the inputs, the expected answer and the id.

    Parameters:
        inputs: input column names; ``None`` means every column but the others.
        expected: the expected-answer column.
        id: the id column, or ``None`` for content-hash ids.
        metadata: columns kept as metadata (not shown to the model).
    """

    inputs: Sequence[str] | None = None
    expected: str = "expected"
    id: str | None = "id"
    metadata: Sequence[str] = ()


def _row_to_example(row: Mapping[str, Any], columns: ColumnMap, where: str) -> Example:
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
    if columns.expected not in row:
        raise DataError(f"missing field {columns.expected!r} (the expected answer)", location=where)
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


def _check_ids(examples: list[Example], locations: list[str]) -> None:
    seen: dict[str, str] = {}
    for example, where in zip(examples, locations, strict=True):
        if example.id in seen:
            raise DataError(
                f"duplicate id {example.id!r} (first at {seen[example.id]})", location=where
            )
        seen[example.id] = where


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"not valid JSON ({exc.args[0]})", location=where) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"a row must be a JSON object, got {type(row).__name__}", location=where
                )
            yield where, row


def _iter_csv(path: Path) -> Iterator[tuple[str, Mapping[str, Any]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise DataError("the row has more cells than the header", location=where)
            yield where, row


def _load(
    rows: Iterator[tuple[str, Mapping[str, Any]]], columns: ColumnMap, path: Path
) -> list[Example]:
    examples: list[Example] = []
    locations: list[str] = []
    for where, row in rows:
        examples.append(_row_to_example(row, columns, where))
        locations.append(where)
    if not examples:
        raise DataError("the dataset is empty", location=str(path))
    _check_ids(examples, locations)
    return examples


def _open_checked(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError("no such file", location=str(p))
    if not os.access(p, os.R_OK):
        raise DataError("the file is not readable", location=str(p))
    return p


def load_jsonl(path: str | os.PathLike[str], columns: ColumnMap | None = None) -> list[Example]:
    """Load a JSONL file (one JSON object per line)."""
    p = _open_checked(path)
    try:
        return _load(_iter_jsonl(p), columns or ColumnMap(), p)
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", location=str(p)) from None


def load_csv(path: str | os.PathLike[str], columns: ColumnMap | None = None) -> list[Example]:
    """Load a CSV file with a header row; cells are strings."""
    p = _open_checked(path)
    try:
        return _load(_iter_csv(p), columns or ColumnMap(), p)
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason})", location=str(p)) from None
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", location=str(p)) from None


def load_dataset(path: str | os.PathLike[str], columns: ColumnMap | None = None) -> list[Example]:
    """Load JSONL (``.jsonl``, ``.ndjson``) or CSV (``.csv``) by the file's suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return load_jsonl(path, columns)
    if suffix in {".csv", ".tsv"}:
        return load_csv(path, columns)
    raise DataError(f"unknown dataset format {suffix!r}; use .jsonl or .csv", location=str(path))
