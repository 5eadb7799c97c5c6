"""Small self-contained SVG charts (no scripts), for the HTML reports.

One renderer for every chart the engine draws in a page: the optimization report's
score per step and the endpoint benchmark's throughput and latency.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Series", "axis", "chart"]


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    color: str
    points: Sequence[tuple[float, float]]
    style: str = "line"  # "line", "dash" (a limit) or "dots"


def axis(high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round tick values from 0 to at least ``high`` (steps of 1, 2, 2.5 or 5 x 10^k;
    whole numbers only with ``integer``, for counts such as steps)."""
    if not high > 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    return [i * step for i in range(math.ceil(high / step - 1e-9) + 1)]


def _shape(series: Series, xy: tuple[float, float, float, float]) -> str:
    """One series in chart coordinates; ``xy`` = (x0, x-scale, y0, y-scale)."""
    x0, sx, y0, sy = xy
    points = [(x0 + x * sx, y0 - y * sy) for x, y in series.points]
    if series.style == "dots":
        return "".join(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.6" fill="{series.color}" fill-opacity="0.45"/>'
            for x, y in points
        )
    dash = ' stroke-dasharray="6 4"' if series.style == "dash" else ""
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return (
        f'<polyline points="{path}" fill="none" stroke="{series.color}" '
        f'stroke-width="{1.5 if dash else 2}"{dash}/>'
    )


def chart(
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    width: int = 540,
    height: int = 250,
    y_max: float | None = None,
    integer_x: bool = False,
) -> str:
    """A small line/dot chart: x from 0, y from 0 (to ``y_max`` when given), round
    ticks, a legend on top."""
    left, right, top, bottom = 52, 12, 34, 38
    xs = [x for s in series for x, _ in s.points] or [1.0]
    ys = [y for s in series for _, y in s.points] or [1.0]
    x_ticks = axis(max(xs), integer=integer_x)
    y_ticks = axis(y_max if y_max is not None else max(ys) * 1.05)
    sx = (width - left - right) / x_ticks[-1]
    sy = (height - top - bottom) / y_ticks[-1]
    y0 = height - bottom
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        # the viewBox lets a page scale the chart down to a narrow screen
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
        f'<text x="{left}" y="14" font-size="12" font-weight="600">{html.escape(title)}</text>',
    ]
    for tick in y_ticks:
        y = y0 - tick * sy
        parts.append(
            f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>'
            f'<text x="{left - 5}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:g}</text>'
        )
    for tick in x_ticks:
        x = left + tick * sx
        parts.append(
            f'<text x="{x:.1f}" y="{y0 + 14}" font-size="10" text-anchor="middle">{tick:g}</text>'
        )
    parts += [_shape(s, (left, sx, y0, sy)) for s in series if s.points]
    legend_x = left
    for s in series:
        parts.append(
            f'<text x="{legend_x}" y="28" font-size="10" fill="{s.color}">'
            f"{html.escape(s.label)}</text>"
        )
        legend_x += 7 * len(s.label) + 16
    parts.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" font-size="10" '
        f'text-anchor="middle">{html.escape(x_label)}</text></svg>'
    )
    return "".join(parts)
