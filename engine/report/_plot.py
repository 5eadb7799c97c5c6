"""The score-per-step PNG of a run report (matplotlib, imported only when asked)."""

from __future__ import annotations

import math
from pathlib import Path

from ._records import RunRecord, score_series

__all__ = ["plot_scores"]


def plot_scores(report: RunRecord, out: Path) -> Path:
    """Write the best train (and val) score per step to ``out``; steps are whole
    numbers on the x axis, and the layout keeps every label inside the image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (label, values), marker in zip(score_series(report), ("o", "s"), strict=False):
        ys = [math.nan if v is None else v for v in values]
        ax.plot(range(len(ys)), ys, marker=marker, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (batch); 0 is the initial prompt")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("TextGradientTrainer: score per step")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
