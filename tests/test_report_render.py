"""The run report's HTML page: its structure, read back with the standard library's HTML
parser, and its rendering in headless Chromium at a desktop's and a phone's width."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from adapters import ArithmeticCoach, ArithmeticModel, arithmetic_examples
from engine import ProposalRecord, RunReport, StepRecord, optimize
from engine.metrics import ExactMatch

from .conftest import qa_prompt, screenshot_in_chromium

LONG = (
    "You are a careful assistant that solves grade-school arithmetic word problems. Read the "
    "question twice, identify every quantity and unit, and compute step by step. Reply with "
    "only the final number, written in digits, with no units, no words and no trailing "
    "punctuation. If the answer is a fraction, reduce it and write it as a decimal rounded "
    "to two places. Never explain your reasoning in the answer."
)
ADDED = "Write the answer in digits and double-check every carry and borrow."


def _prompt(system: str) -> dict[str, object]:
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Question: {question}\nContext: {context}"},
    ]
    return {"messages": messages, "model": "demo"}


def long_report(steps: int = 30) -> RunReport:
    """A run of ``steps`` batches numbered as the trainer numbers them (from 1), with a
    long prompt whose best version adds a sentence; every fourth step accepts."""
    records, best = [], 0.05
    for step in range(1, steps + 1):
        accepted = step % 4 == 1
        best += 0.03 if accepted else 0.0
        proposal = ProposalRecord(
            step, 0, 0, None, accepted, "accepted" if accepted else "rejected: batch", 0.5
        )
        records.append(StepRecord(step, [f"e{step}"], 0.25 * (step % 5), best, best - 0.02))
        records[-1].proposals.append(proposal)
    return RunReport(
        _prompt(LONG),
        _prompt(f"{LONG} {ADDED}"),
        0.05,
        best,
        initial_val_score=0.03,
        val_score=best - 0.02,
        steps=records,
    )


@dataclass
class Cell:
    tag: str
    classes: list[str]
    text: str = ""
    inner: list[str] = field(default_factory=list)  # the tags inside the cell


@dataclass
class Table:
    classes: list[str]
    rows: list[list[Cell]] = field(default_factory=list)


class Page(HTMLParser):
    """Tables (rows of cells with their text), the chart SVGs' tick labels and lines,
    and every tag name seen."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[Table] = []
        self.charts: list[tuple[dict[str, float], list[list[tuple[float, float]]]]] = []
        self.tags: list[str] = []
        self._cell: Cell | None = None
        self._tick: float | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "table":
            self.tables.append(Table(a.get("class", "").split()))
        elif tag == "tr" and self.tables:
            self.tables[-1].rows.append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = Cell(tag, a.get("class", "").split())
            self.tables[-1].rows[-1].append(self._cell)
        elif self._cell is not None:
            self._cell.inner.append(tag)
        elif tag == "svg":
            self.charts.append(({}, []))
        elif tag == "text" and a.get("text-anchor") == "middle":
            self._tick = float(a["x"])
        elif tag == "polyline":
            points = [tuple(map(float, p.split(","))) for p in a["points"].split()]
            self.charts[-1][1].append(points)  # type: ignore[arg-type]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th"):
            self._cell = None
        elif tag == "text":
            self._tick = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.text += data
        elif self._tick is not None and data.strip().lstrip("-").isdigit():
            self.charts[-1][0][data.strip()] = self._tick

    def table(self, cls: str) -> Table:
        (found,) = [t for t in self.tables if cls in t.classes]
        return found


def test_the_diff_puts_each_prompt_under_its_header_and_wraps_only_at_spaces() -> None:
    """Two headers over two columns, every row two cells (no hidden column shifting the
    headers); each line whole in one cell (no hard break inside a word, no
    non-breaking spaces); the added sentence marked as inserted."""
    page_text = long_report().to_html()
    diff = Page(page_text).table("diff")
    header, *rows = diff.rows
    assert [(c.tag, c.text) for c in header] == [("th", "initial prompt"), ("th", "best prompt")]
    assert all([c.classes for c in row] == [["old"], ["new"]] for row in rows)
    assert [c.text for c in rows[1]] == [LONG, f"{LONG} {ADDED}"]
    assert rows[1][1].inner == ["ins"] and rows[1][0].inner == []
    assert [c.text for c in rows[-1]] == ["Context: {context}"] * 2
    assert not any("br" in c.inner or "\xa0" in c.text for row in rows for c in row)


def test_the_steps_table_starts_at_the_initial_prompt_and_the_chart_follows_it() -> None:
    """Step 0 is the initial prompt (no batch score), steps 1..30 follow; the chart's
    point at x = k is the table's step k."""
    report = long_report()
    page = Page(report.to_html())
    header, *rows = page.table("steps").rows
    assert [c.text for c in header][:2] == ["step", "batch"]
    assert [c.text for c in rows[0]][:3] == ["0", "-", "0.050"]
    assert "initial prompt" in rows[0][-1].text
    assert [row[0].text for row in rows] == [str(k) for k in range(31)]
    assert len(page.charts) == 2  # the broad chart and the phone's
    for ticks, (train, _val) in page.charts:
        assert train[0][0] == ticks["0"] and train[-1][0] == ticks["30"]
        assert len(train) == len(rows)


async def test_a_real_runs_steps_count_from_one_as_the_chart_does() -> None:
    """The trainer numbers its batches from 1, so the chart's x (0 = the initial prompt)
    is the step the table, the JSON and the progress line show."""
    data = arithmetic_examples(40)
    result = await optimize(
        qa_prompt(),
        data[:30],
        valset=data[30:],
        metric=ExactMatch(),
        model=ArithmeticModel(habits=("chatty",)),
        optimizer_model=ArithmeticCoach(),
        optimizer_model_name="coach",
        task_description="Answer arithmetic questions.",
        metric_description="Exact match.",
    )
    steps = result.report.steps
    assert [s.step for s in steps] == list(range(1, len(steps) + 1))
    assert {p.step for p in result.report.proposals} <= {s.step for s in steps}
    rows = Page(result.report.to_html()).table("steps").rows[1:]
    assert [r[0].text for r in rows] == [str(k) for k in range(len(steps) + 1)]


def test_the_markdown_report_starts_its_steps_at_the_initial_prompt() -> None:
    lines = long_report(3).to_markdown().splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[1].startswith("| 0 | - | 0.050 | 0.030 | - | initial prompt")
    assert [row.split(" | ")[0] for row in table[1:]] == ["| 0", "| 1", "| 2", "| 3"]


def test_the_page_fits_a_phone_without_scripts() -> None:
    """A viewport, a narrow-screen layout, charts that scale down; nothing executable
    and nothing fetched."""
    page_text = long_report().to_html()
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page_text
    assert "@media (max-width: 640px)" in page_text
    assert page_text.count('viewBox="0 0 ') == 2
    assert "<script" not in page_text and "src=" not in page_text


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
@pytest.mark.parametrize("width", [1280, 390])
def test_the_long_report_renders_in_headless_chromium(tmp_path: Path, width: int) -> None:
    """The 30-step, long-prompt page at a desktop's and a phone's width.  The PNG is for a
    person to look at (tmp_path keeps it); here only that something was drawn."""
    page = tmp_path / "report.html"
    page.write_text(long_report().to_html())
    data = screenshot_in_chromium(
        page, tmp_path / f"report-{width}.png", tmp_path / "profile", size=(width, 2000)
    )
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000  # blank: about 9 KB
