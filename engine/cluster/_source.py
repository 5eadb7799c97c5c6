"""Where a cluster evaluation's examples come from, and how they travel as batches.

- An in-memory dataset (any iterable of `Example`) is cut into `ExampleBatch`es of
  consecutive examples at the driver; each travels to one worker by pickling.
- A `FileDataset` (JSONL or CSV) is read by **Ray Data**: the driver iterates over the
  blocks Ray Data produces, *by reference*, and sends each worker a `FileBatch` naming a
  block and a row range.  The worker fetches the block from Ray's object store and turns
  the rows into `Example`s with the same rules and the same ``file:line`` errors as
  `engine.data`.  The driver never holds the rows.

Batches carry a sequence number: dataset order, which is the order outcomes are
delivered in, and the key by which a batch run twice (its worker died) counts once.
"""

from __future__ import annotations

import csv
import importlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import data as _data
from .._errors import DataError
from .._types import Example
from ..data import ColumnMap
from ._ray import ray_data_module

__all__ = ["Batch", "ExampleBatch", "FileBatch", "FileDataset", "example_batches", "file_batches"]

_JSONL = frozenset({".jsonl", ".ndjson", ".json"})
_CSV = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class FileDataset:
    """A JSONL, CSV or TSV dataset file, read where the work runs.

    On a cluster, Ray Data reads and splits it and the driver never holds it; iterated
    locally (``evaluate(prompt, FileDataset(path), ...)`` without a cluster), it streams
    row by row.  Rows follow `engine.data`'s rules (``columns`` as in `load_dataset`);
    errors name ``file:line`` and the field.
    """

    path: str | os.PathLike[str]
    columns: ColumnMap = field(default_factory=ColumnMap)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.path.abspath(self.path))
        suffix = Path(self.path).suffix.lower()
        if suffix not in _JSONL and suffix not in _CSV:
            raise DataError(
                f"unknown dataset format {suffix!r}; use .jsonl, .csv or .tsv",
                location=str(self.path),
            )
        if not Path(self.path).is_file():
            raise DataError("no such file", location=str(self.path))

    @property
    def is_csv(self) -> bool:
        return Path(self.path).suffix.lower() in _CSV

    def __iter__(self) -> Iterator[Example]:
        # engine.data's own reader, one row at a time (a local run of a big file)
        rows, text_cells = _data._rows(self.path)
        try:
            for where, row in rows:
                yield _data._row_to_example(row, self.columns, where, text_cells=text_cells)
        except UnicodeDecodeError as exc:
            raise DataError(f"not UTF-8 text ({exc.reason})", location=str(self.path)) from None
        except csv.Error as exc:
            raise DataError(f"malformed CSV ({exc})", location=str(self.path)) from None


@dataclass(frozen=True, slots=True)
class ExampleBatch:
    """Consecutive examples of an in-memory dataset, from position ``start``.

    ``seed``: cache rows the driver looked up for them (a relayed cache).
    """

    seq: int
    start: int
    examples: list[Example]
    seed: dict[str, str] = field(default_factory=dict)

    async def load(self) -> list[Example]:
        return self.examples

    def __len__(self) -> int:
        return len(self.examples)


@dataclass(frozen=True, slots=True)
class FileBatch:
    """Rows ``[lo, hi)`` of one Ray Data block of a `FileDataset`.

    ``row`` is the file position of row ``lo`` (0-based, counting blank lines in JSONL
    and data rows in CSV), for error locations.  ``box`` holds the block's object
    reference (in a list, so Ray passes the reference instead of the block).
    """

    seq: int
    box: list[Any]
    lo: int
    hi: int
    row: int
    dataset: FileDataset

    async def load(self) -> list[Example]:
        """The batch's examples (blank JSONL lines skipped), read in the worker."""
        return [example for _, example in await self.load_located()]

    async def load_located(self) -> list[tuple[str, Example]]:
        """The batch's examples with their ``file:line`` (or CSV data row)."""
        block = await self.box[0]
        rows = block.slice(self.lo, self.hi - self.lo)
        if self.dataset.is_csv:
            return self._csv(rows.to_pylist())
        return self._jsonl(rows.column("text").to_pylist())

    def _jsonl(self, lines: list[str]) -> list[tuple[str, Example]]:
        path = self.dataset.path
        examples: list[tuple[str, Example]] = []
        for offset, line in enumerate(lines):
            number = self.row + offset + 1
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark is not data
            where = f"{path}:{number}"
            row = _data.parse_jsonl_row(line, where)
            if row is not None:
                examples.append((where, _data._row_to_example(row, self.dataset.columns, where)))
        return examples

    def _csv(self, rows: list[dict[str, Any]]) -> list[tuple[str, Example]]:
        path, columns, located = self.dataset.path, self.dataset.columns, []
        for offset, row in enumerate(rows):
            where = f"{path}: data row {self.row + offset + 1}"
            located.append((where, _data._row_to_example(row, columns, where, text_cells=True)))
        return located

    def __len__(self) -> int:
        return self.hi - self.lo


Batch = ExampleBatch | FileBatch


def example_batches(examples: Iterable[Example], size: int) -> Iterator[ExampleBatch]:
    """An in-memory dataset in batches of ``size`` consecutive examples."""
    batch: list[Example] = []
    seq = start = 0
    for example in examples:
        batch.append(example)
        if len(batch) == size:
            yield ExampleBatch(seq, start, batch)
            seq, start, batch = seq + 1, start + size, []
    if batch:
        yield ExampleBatch(seq, start, batch)


def _read(dataset: FileDataset) -> Any:
    """The Ray Data dataset of the file's rows, in file order, as text cells."""
    rd = ray_data_module()
    with warnings.catch_warnings():
        # Ray Data copies its context with every dataset, and warns about its own
        # deprecated fields as it does: nothing the caller can act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Reads take no CPU slot: the workers may hold every CPU of the cluster, and a
        # read waiting for one of them would never start.
        if dataset.is_csv:
            ds = rd.read_csv(dataset.path, num_cpus=0, **_csv_options(dataset))
        else:
            ds = rd.read_text(dataset.path, drop_empty_lines=False, num_cpus=0)
        context = ds.context
        context.execution_options.preserve_order = True  # file order: dataset order
        context.enable_progress_bars = False  # a library prints nothing
        context.print_on_execution_start = False
    return ds


def _csv_options(dataset: FileDataset) -> dict[str, Any]:
    """Arrow CSV options that keep every cell as the text it is (as `engine.data`
    does: ``007`` stays ``"007"``, an empty cell stays ``""``)."""
    pa = importlib.import_module("pyarrow")  # Ray Data's own dependency
    pa_csv = importlib.import_module("pyarrow.csv")
    delimiter = _CSV[Path(dataset.path).suffix.lower()]
    with open(dataset.path, encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), None)
    if not header:
        raise DataError("the dataset is empty", location=str(dataset.path))
    return {
        "parse_options": pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        "convert_options": pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in header},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    }


def file_batches(dataset: FileDataset, size: int) -> Iterator[FileBatch]:
    """The file in batches of at most ``size`` rows, in file order, by reference.

    Blocking (Ray Data executes as the iterator is drained): iterate it in a thread.
    """
    row = seq = 0
    for bundle in _read(dataset).iter_internal_ref_bundles():
        for entry in bundle.blocks:
            ref, metadata = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            rows = int(metadata.num_rows)
            for lo in range(0, rows, size):
                hi = min(rows, lo + size)
                yield FileBatch(seq, [ref], lo, hi, row + lo, dataset)
                seq += 1
            row += rows
