"""The run report of `optimize`: JSON, a Markdown summary, an HTML page and a plot."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._plot import plot_scores
from ._records import RunRecord
from ._render import render_html, render_markdown

__all__ = ["RunReport"]


@dataclass
class RunReport(RunRecord):
    """Everything a run did; ``to_json``, ``to_markdown``, ``to_html`` and ``plot`` render it."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.hedges:  # no hedging: the report reads exactly as before hedging
            del data["hedges"]
        if not self.program:  # one prompt: the report reads exactly as before programs
            del data["program"]
            for step in data["steps"]:
                del step["stage"]
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2, **kwargs)

    def to_markdown(self) -> str:
        """A Markdown summary: scores, what it cost, every step and proposal."""
        return render_markdown(self)

    def to_html(self) -> str:
        """A self-contained HTML page: scores per step (inline SVG), the prompt diff,
        the steps and every proposal with its outcome.  No scripts, no external files."""
        return render_html(self)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of best train score (and val score) per step; needs matplotlib."""
        return plot_scores(self, Path(path))
