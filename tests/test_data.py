"""Dataset loading: JSONL and CSV, column maps, errors that name file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import DataError
from engine.data import ColumnMap, load_csv, load_dataset, load_jsonl


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
