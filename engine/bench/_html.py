"""The endpoint benchmark as one self-contained HTML page (inline SVG, no scripts).

Per level: requests per second over time with the announced (and configured) request
limit drawn as a dashed line, 429s per second, and every attempt's latency as a dot
with the per-second median and p95.  Tokens per second get their own plot when the
endpoint announces a token limit.
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

from .._svg import Series, chart

if TYPE_CHECKING:
    from ._records import BenchRecord
    from ._stats import LevelResult

__all__ = ["render_bench_html"]

# Dots drawn per latency plot at most (a long level is thinned evenly).
_MAX_DOTS = 1500
_BLUE, _ORANGE, _RED, _GREY, _GREEN = "#1f6feb", "#d97706", "#cf222e", "#6e7781", "#1a7f37"


def _limit(label: str, per_second: float | None, end: float, color: str) -> list[Series]:
    if per_second is None:
        return []
    return [Series(label, color, [(0.0, per_second), (end, per_second)], "dash")]


def _throughput(level: LevelResult, configured_rpm: float | None) -> str:
    end = max(level.wall_s, 1.0)
    # the last second is partial: count it over the time it covers (half a second at least)
    rate = [
        (b.t + 0.5, b.answered / max(0.5, min(1.0, level.wall_s - b.t))) for b in level.timeline
    ]
    limited = [(b.t + 0.5, float(b.rate_limited)) for b in level.timeline]
    announced = level.limit_requests_per_min
    series = [Series("answers/s", _BLUE, rate)]
    if any(y for _, y in limited):
        series.append(Series("429s/s", _RED, limited))
    series += _limit(
        f"announced limit {announced}/min", announced / 60 if announced else None, end, _RED
    )
    if configured_rpm is not None and configured_rpm != announced:
        series += _limit(f"configured rpm {configured_rpm:g}", configured_rpm / 60, end, _GREY)
    per_request = (level.prompt_tokens_mean or 0.0) + (level.completion_tokens_mean or 0.0)
    if level.limit_tokens_per_min is not None and per_request > 0:
        series += _limit(
            f"token limit at {per_request:.0f} tokens/request",
            level.limit_tokens_per_min / per_request / 60,
            end,
            _ORANGE,
        )
    return chart(
        f"throughput, concurrency {level.concurrency}", series, x_label="seconds into the level"
    )


def _tokens(level: LevelResult) -> str:
    end = max(level.wall_s, 1.0)
    limit = level.limit_tokens_per_min
    series = [Series("tokens/s", _GREEN, [(b.t + 0.5, float(b.tokens)) for b in level.timeline])]
    series += _limit(f"announced limit {limit}/min", limit / 60 if limit else None, end, _RED)
    return chart(
        f"tokens, concurrency {level.concurrency}", series, x_label="seconds into the level"
    )


def _latency(level: LevelResult) -> str:
    samples = level.samples
    stride = max(1, math.ceil(len(samples) / _MAX_DOTS))
    shown = samples[::stride]
    series = [
        Series(
            "attempt latency", _GREY, [(t, lat) for t, lat, err in shown if err is None], "dots"
        ),
        Series(
            "failed attempt", _RED, [(t, lat) for t, lat, err in shown if err is not None], "dots"
        ),
        Series(
            "p50 per second",
            _BLUE,
            [(b.t + 0.5, b.p50_s) for b in level.timeline if b.p50_s is not None],
        ),
        Series(
            "p95 per second",
            _ORANGE,
            [(b.t + 0.5, b.p95_s) for b in level.timeline if b.p95_s is not None],
        ),
    ]
    return chart(
        f"latency (s), concurrency {level.concurrency}",
        series,
        x_label="seconds into the level (dots at the attempt's start)",
    )


def _num(value: float | int | None, spec: str, unknown: str = "&ndash;") -> str:
    return unknown if value is None else format(value, spec)


def _rows(report: BenchRecord) -> str:
    out = []
    for lv in report.levels:
        errors = ", ".join(f"{html.escape(k)} {v}" for k, v in sorted(lv.errors.items())) or "0"
        out.append(
            f"<tr><td>{lv.concurrency}</td><td>{lv.requests}</td><td>{lv.attempts}</td>"
            f"<td>{_num(lv.requests_per_s, '.1f')}</td><td>{_num(lv.tokens_per_s, '.0f')}</td>"
            f"<td>{_num(lv.limit_requests_per_min, 'd', 'unknown')}</td>"
            f"<td>{_num(lv.fraction_of_request_limit, '.2f')}</td>"
            f"<td>{_num(lv.limit_tokens_per_min, 'd', 'unknown')}</td>"
            f"<td>{_num(lv.fraction_of_token_limit, '.2f')}</td><td>{lv.share_429:.1%}</td>"
            f"<td>{_num(lv.retry_after_max_s, '.1f')}</td><td>{_num(lv.p50_s, '.3f')}</td>"
            f"<td>{_num(lv.p95_s, '.3f')}</td><td>{_num(lv.p99_s, '.3f')}</td>"
            f"<td>{_num(lv.max_s, '.3f')}</td><td>{errors}</td>"
            f"<td>{_num(lv.cost_per_1000_usd, '.4f')}</td></tr>"
        )
    return "".join(out)


def _fractions(level: LevelResult) -> str:
    parts = [
        f"{fraction:.2f} {unit}"
        for fraction, unit in (
            (level.fraction_of_request_limit, "req"),
            (level.fraction_of_token_limit, "tok"),
            (level.fraction_of_input_token_limit, "input tok"),
            (level.fraction_of_output_token_limit, "output tok"),
        )
        if fraction is not None
    ]
    return ", ".join(parts) or "unknown"


def _money(value: float | None, spec: str) -> str:
    return "unknown" if value is None else "$" + format(value, spec)


def _kpis(report: BenchRecord) -> str:
    items = [("sweep", f"{report.attempts} requests, {_money(report.cost_usd, '.4f')}")]
    best, projection = report.best, report.projection
    if best is not None and best.requests_per_s is not None:
        items = [
            ("best rate", f"{best.requests_per_s:.1f}/s at {best.concurrency}"),
            ("of announced limits", _fractions(best)),
            ("p50 / p95 at best", f"{_num(best.p50_s, '.3f')} / {_num(best.p95_s, '.3f')} s"),
            *items,
        ]
    if projection is not None:
        items += [
            ("projection", f"{projection.examples:,} ex: {projection.wall_s / 3600:.2f} h"),
            ("projected cost", _money(projection.cost_usd, ",.2f")),
        ]
    return "".join(f"<div>{html.escape(k)}<b>{v}</b></div>" for k, v in items)


# On a phone the charts scale down (their viewBox) and the wide levels table scrolls in
# its own box instead of widening the page.
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 1rem 1.25rem;
  max-width: 1140px; color: #111; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 12px; }
td, th { padding: 3px 7px; border-bottom: 1px solid #eee; text-align: right; }
th { background: #f6f8fa; }
.kpi { display: flex; flex-wrap: wrap; gap: 1rem; }
.kpi div { background: #f6f8fa; padding: .5rem .9rem; }
.kpi b { font-size: 1.15rem; display: block; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
pre { background: #f6f8fa; padding: .7rem 1rem; overflow-x: auto; }
svg { max-width: 100%; height: auto; }
.wide { overflow-x: auto; max-width: 100%; }
p { overflow-wrap: break-word; }
"""


def render_bench_html(report: BenchRecord) -> str:
    """The page for ``report``; every value from the endpoint is escaped."""
    configured_rpm = report.configured.rpm if report.configured is not None else None
    sections = []
    for lv in report.levels:
        plots = [_throughput(lv, configured_rpm), _latency(lv)]
        if lv.limit_tokens_per_min is not None:
            plots.append(_tokens(lv))
        stopped = f"<p>Stopped: {html.escape(lv.stopped)}</p>" if lv.stopped else ""
        sections.append(
            f"<h2>Concurrency {lv.concurrency}</h2>{stopped}"
            f'<div class="plots">{"".join(plots)}</div>'
        )
    stopped = (
        f"<p><b>Stopped early:</b> {html.escape(report.stopped)}</p>" if report.stopped else ""
    )
    kind = "a synthetic load" if report.synthetic else "the run's prompt over its rows"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Endpoint benchmark</title>
<style>{_STYLE}</style></head><body>
<h1>Endpoint benchmark: {html.escape(report.endpoint)}</h1>
<p>Model {html.escape(report.model)}, {kind}; every request through the engine's
limiter and retry policy, as a run sends it. Rates are over each level's steady part
(the second half of its requests, by start time); latency is per attempt, as the
adapter saw it.</p>
<div class="kpi">{_kpis(report)}</div>
{stopped}
<h2>Levels</h2>
<div class="wide"><table><tr><th>concurrency</th><th>answered</th><th>attempts</th><th>req/s</th>
<th>tok/s</th><th>RPM limit</th><th>of RPM</th><th>TPM limit</th><th>of TPM</th>
<th>429s</th><th>Retry-After max</th><th>p50 s</th><th>p95 s</th><th>p99 s</th><th>max s</th>
<th>errors (attempts)</th><th>$ / 1k examples</th></tr>
{_rows(report)}</table></div>
<h2>Recommendation (paste into the run file)</h2>
<pre>{html.escape(report.recommendation.to_toml())}</pre>
{"".join(sections)}
</body></html>
"""
