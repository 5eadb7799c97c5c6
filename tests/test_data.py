"""Dataset loading: JSONL and CSV, column maps, errors that name file, line and field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from engine import DataError
from engine.data import ColumnMap, load_csv, load_dataset, load_jsonl, load_splits, row_location


def test_csv_with_a_column_map(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("qid,text,label,source\n1,hello,greeting,web\n2,bye,farewell,web\n")
    rows = load_csv(
        path, ColumnMap(inputs=["text"], expected="label", id="qid", metadata=["source"])
    )
    assert [(r.id, dict(r.inputs), r.expected, dict(r.metadata)) for r in rows] == [
        ("1", {"text": "hello"}, "greeting", {"source": "web"}),
        ("2", {"text": "bye"}, "farewell", {"source": "web"}),
    ]


def test_jsonl_rows_in_engine_shape(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"inputs": {"q": "a"}, "expected": "b"}\n\n{"inputs": {"q": "c"}, "expected": "d"}\n'
    )
    rows = load_jsonl(path)
    assert [dict(r.inputs) for r in rows] == [{"q": "a"}, {"q": "c"}]
    assert rows[0].id != rows[1].id  # content-hash ids


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "d.jsonl",
            '{"id": "1", "q": "a", "expected": 1}\n[1, 2]\n',
            "d.jsonl:2: a row must be a JSON object",
        ),
        ("d.jsonl", '{"id": {"x": 1}, "q": "a", "expected": 1}\n', "d.jsonl:1: field 'id' must be"),
        ("d.jsonl", '{"id": "1", "expected": 1}\n', "d.jsonl:1: the row has no input fields"),
        ("d.csv", "id,q,expected\n1,a,b,extra\n", "d.csv:2: the row has more cells"),
        ("d.csv", "id,q,expected\n1,a,b\n1,c,d\n", "d.csv:3: duplicate id '1' (first at"),
        ("d.txt", "whatever", "unknown dataset format"),
    ],
)
def test_malformed_rows_name_the_place(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert message in str(info.value)


def test_missing_and_binary_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(path)


def test_tsv_is_read_with_tabs(tmp_path: Path) -> None:
    """A .tsv file splits on tabs, so commas stay inside a cell."""
    path = tmp_path / "d.tsv"
    path.write_text("id\tquestion\texpected\n1\t1, 2 or 3?\t3\n")
    [row] = load_dataset(path)
    assert (row.id, dict(row.inputs), row.expected) == ("1", {"question": "1, 2 or 3?"}, "3")


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("d.csv", "id,question,expected\n1,q,a\n"),
        ("d.jsonl", '{"id": "1", "question": "q", "expected": "a"}\n'),
    ],
)
def test_a_byte_order_mark_is_not_data(tmp_path: Path, name: str, text: str) -> None:
    """Files saved with a UTF-8 BOM have a clean first column ('id', not '\\ufeffid')."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    [row] = load_dataset(path)
    assert (row.id, dict(row.inputs)) == ("1", {"question": "q"})


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        (
            "d.jsonl",
            '{"id": "1", "q": "a", "expected": null}\n',
            "d.jsonl:1: field 'expected' (the expected answer) is null",
        ),
        (
            "d.jsonl",
            '{"inputs": {"q": "a"}, "expected": null}\n',
            "d.jsonl:1: field 'expected' (the expected answer) is null",
        ),
        (
            "d.csv",
            "id,q,expected\n1,a,b\n2,c,\n",
            "d.csv:3: field 'expected' (the expected answer) is empty",
        ),
        (
            "d.csv",
            "id,q,expected\n1,a\n",
            "d.csv:2: the row has fewer cells than the header (no 'expected')",
        ),
        (
            "d.tsv",
            "id\tq\texpected\n1\ta\t\n",
            "d.tsv:2: field 'expected' (the expected answer) is empty",
        ),
    ],
)
def test_a_missing_expected_answer_names_the_row(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    """An absent answer is an error, never the text 'null' or '' to score against."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_dataset(path)
    assert message in str(info.value)


def test_an_empty_string_answer_in_jsonl_is_kept(tmp_path: Path) -> None:
    """JSON can say "" on purpose; only CSV's empty cell means 'missing'."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "1", "q": "a", "expected": ""}\n')
    assert load_dataset(path)[0].expected == ""


def test_one_input_column_given_as_a_string(tmp_path: Path) -> None:
    """ColumnMap(inputs="question") means one column, not its characters."""
    path = tmp_path / "d.csv"
    path.write_text("id,question,other,expected\n1,q,o,a\n")
    assert ColumnMap(inputs="question").inputs == ("question",)
    [row] = load_csv(path, ColumnMap(inputs="question", metadata="other"))
    assert (dict(row.inputs), dict(row.metadata)) == ({"question": "q"}, {"other": "o"})


def test_an_id_means_one_example_across_splits(tmp_path: Path) -> None:
    """Same id and same inputs in both splits is allowed; different inputs name both rows."""
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text(
        '{"id": "a", "q": "1", "expected": "1"}\n{"id": "b", "q": "2", "expected": "2"}\n'
    )
    val.write_text('{"id": "b", "q": "2", "expected": "2"}\n')
    rows, held_out = load_splits(train, val)
    assert len(rows) == 2 and held_out is not None and held_out[0].id == "b"
    val.write_text('\n{"id": "b", "q": "two", "expected": "2"}\n')
    with pytest.raises(DataError) as info:
        load_splits(train, val)
    assert f"{val}:2: id 'b' is also in the training set ({train}:2) with different inputs" in str(
        info.value
    )
    assert load_splits(train, None)[1] is None


def test_row_location_maps_an_index_to_its_line(tmp_path: Path) -> None:
    """Blank lines are skipped as the loader skips them; CSV counts the header."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(
        '{"id": "a", "q": "1", "expected": "1"}\n\n{"id": "b", "q": "2", "expected": "2"}\n'
    )
    assert row_location(jsonl, 1) == f"{jsonl}:3"
    csv = tmp_path / "d.csv"
    csv.write_text("id,q,expected\n1,a,b\n2,c,d\n")
    assert row_location(csv, 1) == f"{csv}:3"
    assert row_location(csv, 9) is None and row_location(tmp_path / "nope.csv", 0) is None


@pytest.mark.parametrize("loader", [load_dataset, load_jsonl, load_csv])
def test_a_fifo_or_a_folder_is_named_for_what_it_is(tmp_path: Path, loader: Any) -> None:
    """Issue 18: a FIFO path said "no such file" (and reading one would block forever)."""
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"not a regular file \(it is a FIFO") as caught:
        loader(fifo)
    assert "no such file" not in str(caught.value) and str(fifo) in str(caught.value)
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=r"not a regular file \(it is a directory\)"):
        loader(folder)
    with pytest.raises(DataError, match="no such file"):
        loader(tmp_path / "absent.jsonl")
