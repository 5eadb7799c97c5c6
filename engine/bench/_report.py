"""The result of an endpoint sweep: the best level, the projection, the recommended
``[model.limits]``, and the fixed-width table `textgrad bench` prints."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .._budget import Price
from ..endpoint import Limits
from ._html import render_bench_html
from ._records import BenchRecord, Projection, Recommendation
from ._stats import LevelResult

__all__ = [
    "BenchReport",
    "Projection",
    "Recommendation",
    "best_level",
    "format_table",
    "project",
    "recommend",
    "serves_at_a_time",
]

# A level within this fraction of the best rate counts as reaching it (the knee).
_NEAR_BEST = 0.95
# Fewer answers than this per slot and a level hardly leaves its ramp-up.
_STEADY_PER_SLOT = 4
# A queueing server: past its width, throughput within this share of the best while
# the median latency grows in proportion to concurrency (within these ratios).
_FLAT_RATE = 0.85
_LINEAR = (0.7, 1.4)


@dataclass(frozen=True, slots=True)
class BenchReport(BenchRecord):
    """The whole sweep (see `BenchRecord`) with its renderings: a table and a page."""

    def to_table(self) -> str:
        """The fixed-width table `format_table` makes."""
        return format_table(self)

    def to_html(self) -> str:
        """One self-contained page: the table, and per level the throughput and
        latency over time with the announced limit drawn as a line (inline SVG)."""
        return render_bench_html(self)


def best_level(levels: Sequence[LevelResult]) -> LevelResult | None:
    """The smallest concurrency within 5% of the highest rate measured: slots past it
    buy nothing.  ``None`` when no level answered anything."""
    measured = [lv for lv in levels if lv.requests_per_s]
    if not measured:
        return None
    top = max(lv.requests_per_s or 0.0 for lv in measured)
    near = [lv for lv in measured if (lv.requests_per_s or 0.0) >= _NEAR_BEST * top]
    return min(near, key=lambda lv: lv.concurrency)


def serves_at_a_time(levels: Sequence[LevelResult]) -> int | None:
    """How many requests a server that queues serves at a time, or ``None``.

    A local model server (llama.cpp, Ollama) serves a few requests and queues the rest:
    past that width the throughput stays flat and each request waits for the ones
    ahead, so the median latency grows in proportion to concurrency.  Seen on at least
    two levels past the best one, the width is the best rate times one service time
    (Little's law; the service time is the median latency of the lowest level).
    """
    best = best_level(levels)
    measured = sorted(
        (lv for lv in levels if lv.requests_per_s and lv.p50_s), key=lambda lv: lv.concurrency
    )
    if best is None or best.p50_s is None or len(measured) < 3:
        return None
    top = max(lv.requests_per_s or 0.0 for lv in measured)
    past = [lv for lv in measured if lv.concurrency > best.concurrency]
    if len(past) < 2:
        return None
    for lv in past:
        assert lv.p50_s is not None and lv.requests_per_s is not None
        grew = (lv.p50_s / best.p50_s) / (lv.concurrency / best.concurrency)
        if lv.requests_per_s < _FLAT_RATE * top or not _LINEAR[0] <= grew <= _LINEAR[1]:
            return None
    service = measured[0].p50_s
    assert service is not None
    return max(1, round(top * service))


def recommend(levels: Sequence[LevelResult], configured: Limits | None = None) -> Recommendation:
    """The concurrency and rates to configure, from a sweep's levels.

    Concurrency: the `best_level`.  Rates: the limits the endpoint announced; else,
    when it sent 429s, 95% of the best rate it sustained; else none (no limit was
    found up to the highest level tried).
    """
    best = best_level(levels)
    if best is None:
        return Recommendation(
            None, None, None, False, ("no request was answered: nothing to recommend",)
        )
    top_rate = max(lv.requests_per_s or 0.0 for lv in levels)
    notes = [
        f"concurrency {best.concurrency}: the smallest level within 5% of the highest rate "
        f"measured ({top_rate:.1f} requests/s)"
    ]
    width = serves_at_a_time(levels)
    if width is not None:
        best = next((lv for lv in levels if lv.concurrency >= width), best)
        best = dataclasses.replace(best, concurrency=width)
        notes = [
            f"the server serves about {width} request(s) at a time: past that, latency "
            "grows with concurrency at flat throughput (requests wait in its queue); "
            f"concurrency {width}"
        ]
    announced = _last_announced(levels)
    if any(announced.values()):
        rpm, tpm = announced["rpm"], announced["tpm"]
        notes.append("rates: the limits the endpoint announces (its rate-limit headers)")
        notes += _binding_notes(best, rpm, tpm) + _split_binding_notes(best, announced)
        notes += _configured_notes(configured, announced)
        return Recommendation(
            best.concurrency,
            rpm,
            tpm,
            True,
            tuple(notes),
            input_tpm=announced["input_tpm"],
            output_tpm=announced["output_tpm"],
        )
    if any(lv.share_429 > 0 for lv in levels):
        sustained = math.floor(top_rate * 60 * _NEAR_BEST)
        notes.append(
            f"the endpoint announces no limits but sent 429s: rpm {sustained} is 95% of "
            "the highest rate it sustained"
        )
        return Recommendation(best.concurrency, sustained, None, True, tuple(notes))
    return _no_limit_found(levels, best, configured, notes)


def _no_limit_found(
    levels: Sequence[LevelResult],
    best: LevelResult,
    configured: Limits | None,
    notes: list[str],
) -> Recommendation:
    top = max(lv.concurrency for lv in levels)
    notes.append(
        f"no limit was found up to concurrency {top}: the endpoint announced none and sent no 429"
    )
    if best.concurrency == top and len(levels) > 1:
        notes.append(f"the rate was still rising at concurrency {top}: try higher levels")
    if configured is not None and (configured.rpm or configured.tpm):
        notes += _held_back(best, configured)
        return Recommendation(
            best.concurrency,
            configured.rpm,
            configured.tpm,
            False,
            tuple(notes),
            input_tpm=configured.input_tpm,
            output_tpm=configured.output_tpm,
        )
    return Recommendation(best.concurrency, None, None, False, tuple(notes))


def _held_back(best: LevelResult, configured: Limits) -> list[str]:
    """Whether the run file's own rates, not the endpoint, capped the sweep."""
    capped = [
        f"{name} = {limit:g} ({rate * 60 / limit:.2f} of it reached)"
        for name, limit, rate in (
            ("rpm", configured.rpm, best.requests_per_s),
            ("tpm", configured.tpm, best.tokens_per_s),
        )
        if limit and rate and rate * 60 >= _NEAR_BEST * limit
    ]
    if not capped:
        return ["the run file's own rpm/tpm are kept (the sweep stayed under them)"]
    return [
        f"the run file's {' and '.join(capped)} capped the sweep, not the endpoint: "
        "raise them to look further"
    ]


def _last_announced(levels: Sequence[LevelResult]) -> dict[str, int | None]:
    """The last limits any level saw announced, by the run file's key for each."""
    fields = {
        "rpm": "limit_requests_per_min",
        "tpm": "limit_tokens_per_min",
        "input_tpm": "limit_input_tokens_per_min",
        "output_tpm": "limit_output_tokens_per_min",
    }
    return {
        key: next((getattr(lv, name) for lv in reversed(levels) if getattr(lv, name)), None)
        for key, name in fields.items()
    }


def _split_binding_notes(best: LevelResult, announced: dict[str, int | None]) -> list[str]:
    """What the input and output token limits (ITPM, OTPM) allow at this request size.

    The engine reserves a request's ``max_tokens`` of the output limit until the
    answer's usage settles it, so the output limit may bind earlier than it says.
    """
    notes = []
    for key, mean, unit in (
        ("input_tpm", best.prompt_tokens_mean, "input"),
        ("output_tpm", best.completion_tokens_mean, "output"),
    ):
        limit = announced[key]
        if limit and mean:
            notes.append(
                f"{key} {limit:,} {unit} tokens/min at {mean:,.0f} per request allow "
                f"{limit / mean:,.0f} requests/min"
            )
    return notes


def _binding_notes(best: LevelResult, rpm: int | None, tpm: int | None) -> list[str]:
    """Which announced limit a run of this request size meets first."""
    per_request = (best.prompt_tokens_mean or 0.0) + (best.completion_tokens_mean or 0.0)
    if tpm is None or per_request <= 0:
        return []
    by_tokens = tpm / per_request
    if rpm is not None and by_tokens >= rpm:
        return [f"the request limit binds: {tpm:,} tokens/min allow {by_tokens:,.0f} requests/min"]
    return [
        f"the token limit binds: {tpm:,} tokens/min at {per_request:,.0f} tokens per request "
        f"allow {by_tokens:,.0f} requests/min"
    ]


def _configured_notes(configured: Limits | None, announced: dict[str, int | None]) -> list[str]:
    mine_by_key = {
        key: getattr(configured, key) if configured is not None else None for key in announced
    }
    if not any(v is not None for v in mine_by_key.values()):
        return ["set in the run file these hold as given (learned, the engine keeps a margin)"]
    notes = []
    for name, mine in mine_by_key.items():
        theirs = announced[name]
        if mine is not None and theirs is not None and mine < theirs:
            notes.append(
                f"the run file's {name} = {mine:g} held the sweep below the {theirs}/min allowed"
            )
    return notes


def project(
    levels: Sequence[LevelResult], best: LevelResult | None, examples: int, price: Price | None
) -> Projection | None:
    """``examples`` requests at the best level's rate, each at the sweep's mean cost per
    answered request (cost does not depend on concurrency; every level's answers count)."""
    if best is None or not best.requests_per_s:
        return None
    answered = sum(lv.requests for lv in levels)
    spent = [lv.cost_usd for lv in levels if lv.cost_usd is not None]
    per_request = sum(spent) / answered if price is not None and answered else None
    return Projection(
        examples=examples,
        concurrency=best.concurrency,
        requests_per_s=best.requests_per_s,
        wall_s=examples / best.requests_per_s,
        cost_usd=per_request * examples if per_request is not None else None,
    )


def _cell(value: float | None, spec: str, unknown: str = "-") -> str:
    return unknown if value is None else format(value, spec)


def format_table(report: BenchReport) -> str:
    """The sweep as a fixed-width text table, then the best level and the projection."""
    head = (
        f"{'conc':>5} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'RPM limit':>9} {'of RPM':>6} "
        f"{'TPM limit':>9} {'of TPM':>6} {'429s':>6} {'retry-after':>11} {'p50 s':>6} "
        f"{'p95 s':>6} {'p99 s':>6} {'max s':>6} {'errors':>6} {'$/1k ex':>8}"
    )
    split = _has_split_limits(report.levels)
    if split:
        head += f" {'ITPM limit':>10} {'of ITPM':>7} {'OTPM limit':>10} {'of OTPM':>7}"
    lines = [f"endpoint {report.endpoint}, model {report.model}", head]
    for lv in report.levels:
        errors = sum(n for name, n in lv.errors.items() if name != "RateLimitedError")
        extra = _split_cells(lv) if split else ""
        lines.append(
            f"{lv.concurrency:>5} {lv.requests:>8} {_cell(lv.requests_per_s, '7.1f'):>7} "
            f"{_cell(lv.tokens_per_s, '8.0f'):>8} "
            f"{_cell(lv.limit_requests_per_min, 'd', 'unknown'):>9} "
            f"{_cell(lv.fraction_of_request_limit, '6.2f'):>6} "
            f"{_cell(lv.limit_tokens_per_min, 'd', 'unknown'):>9} "
            f"{_cell(lv.fraction_of_token_limit, '6.2f'):>6} {lv.share_429:>6.1%} "
            f"{_cell(lv.retry_after_max_s, '.1f'):>11} {_cell(lv.p50_s, '6.3f'):>6} "
            f"{_cell(lv.p95_s, '6.3f'):>6} {_cell(lv.p99_s, '6.3f'):>6} "
            f"{_cell(lv.max_s, '6.3f'):>6} {errors:>6} "
            f"{_cell(lv.cost_per_1000_usd, '8.4f'):>8}{extra}"
        )
    lines += _summary_lines(report)
    return "\n".join(lines)


def _has_split_limits(levels: Sequence[LevelResult]) -> bool:
    """Whether any level saw input and output token limits announced apart."""
    return any(
        lv.limit_input_tokens_per_min is not None or lv.limit_output_tokens_per_min is not None
        for lv in levels
    )


def _split_cells(lv: LevelResult) -> str:
    """The input and output token limits' columns of one level (ITPM, OTPM)."""
    return (
        f" {_cell(lv.limit_input_tokens_per_min, 'd', 'unknown'):>10} "
        f"{_cell(lv.fraction_of_input_token_limit, '7.2f'):>7} "
        f"{_cell(lv.limit_output_tokens_per_min, 'd', 'unknown'):>10} "
        f"{_cell(lv.fraction_of_output_token_limit, '7.2f'):>7}"
    )


def _summary_lines(report: BenchReport) -> list[str]:
    lines = []
    for lv in report.levels:
        if lv.requests < _STEADY_PER_SLOT * lv.concurrency:
            lines.append(
                f"concurrency {lv.concurrency}: {lv.requests} answers are few for "
                f"{lv.concurrency} in flight; its rate may be ramp-dominated (use --requests "
                f"{_STEADY_PER_SLOT * lv.concurrency} or more)"
            )
        other = {k: v for k, v in lv.errors.items() if k != "RateLimitedError"}
        for name, count in sorted(other.items()):
            lines.append(
                f"errors at concurrency {lv.concurrency}: {name} x{count} "
                f"(last: {lv.error_examples.get(name, '')})"
            )
    if report.stopped:
        lines.append(f"stopped early: {report.stopped}")
    best, projection = report.best, report.projection
    if best is not None and best.requests_per_s is not None:
        reached = [
            f"{fraction:.2f} of the announced {limit:,} {unit}/min"
            for fraction, limit, unit in (
                (best.fraction_of_request_limit, best.limit_requests_per_min, "requests"),
                (best.fraction_of_token_limit, best.limit_tokens_per_min, "tokens"),
                (
                    best.fraction_of_input_token_limit,
                    best.limit_input_tokens_per_min,
                    "input tokens",
                ),
                (
                    best.fraction_of_output_token_limit,
                    best.limit_output_tokens_per_min,
                    "output tokens",
                ),
            )
            if fraction is not None and limit is not None
        ]
        of_limits = "; ".join(reached) or "the endpoint announced no limit"
        lines.append(
            f"best: concurrency {best.concurrency}, {best.requests_per_s:.1f} requests/s "
            f"({of_limits})"
        )
    if projection is not None:
        cost = (
            f", ${projection.cost_usd:,.2f}"
            if projection.cost_usd is not None
            else ", cost unknown (no price)"
        )
        lines.append(
            f"projection for {projection.examples:,} examples at concurrency "
            f"{projection.concurrency}: {_duration(projection.wall_s)}{cost}"
        )
    spent = f"${report.cost_usd:.4f}" if report.cost_usd is not None else "cost unknown (no price)"
    lines.append(f"this sweep: {report.attempts} requests sent, {spent}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
