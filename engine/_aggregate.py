"""One place for how per-example outcomes become an evaluation's scores.

Used by `evaluate` and by a cluster's driver alike, so a cluster evaluation scores
exactly as a local one: the global metric over the scored examples, its conservative
form (every errored example a failure), the checks on what it returns, the rule for
when racing has an exact bound, and the event summary of an evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._errors import ConfigError, GlobalMetricError
from ._outcome import Evaluation, GlobalMetric, Outcome
from ._tally import Tally
from ._types import MetricResult

__all__ = [
    "check_global_metric",
    "check_racing",
    "checked_global",
    "conservative_score",
    "evaluation_summary",
    "global_scores",
    "is_mean",
    "mean",
]

IndexedResult = tuple[int, MetricResult | None, str]
"""(example index, its result or None when it errored, the error's message)."""


def is_mean(global_metric: GlobalMetric | None) -> bool:
    """Whether ``global_metric`` is the mean (for which racing has an exact bound)."""
    return global_metric is None or global_metric is mean


def mean(results: Sequence[MetricResult]) -> float:
    """The default global metric; NaN for no results (no score, never a silent 0)."""
    return sum(r.score for r in results) / len(results) if results else math.nan


def check_racing(must_beat: float, total: int | None, global_metric: GlobalMetric | None) -> None:
    """Raise `ConfigError` unless racing against ``must_beat`` can be exact."""
    if not is_mean(global_metric):
        raise ConfigError("must_beat (racing) needs the mean; a global metric turns it off")
    if total is None:
        raise ConfigError("must_beat (racing) needs a dataset with a known length")
    if math.isnan(must_beat) or not 0.0 <= must_beat <= 1.0:
        raise ConfigError(f"must_beat must be in [0, 1], got {must_beat!r}")


def _name(metric: GlobalMetric) -> str:
    return str(getattr(metric, "__qualname__", type(metric).__qualname__))


def checked_global(
    metric: GlobalMetric, results: Sequence[MetricResult], what: str = "the results"
) -> float:
    """The global metric's value, which must be a score in [0, 1]; anything it raises
    is a `GlobalMetricError` naming the metric, the cause and ``what`` it was given."""
    try:
        value = float(metric(results))
    except Exception as exc:
        raise GlobalMetricError(
            f"the global metric {_name(metric)} raised {type(exc).__name__} on {what} "
            f"({len(results)} results): {exc}"
        ) from exc
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise GlobalMetricError(
            f"the global metric {_name(metric)} returned {value!r} on {what}, not a score in [0, 1]"
        )
    return value


def check_global_metric(metric: GlobalMetric | None, results: Sequence[MetricResult]) -> None:
    """Run the global metric on the batches a run will give it, built from ``results``
    (say the per-example metric on a few expected answers), before anything is paid:
    all of them, the first alone, each side alone (only right, only wrong), and every
    one errored (what the conservative score passes when a whole batch fails).  Raise
    `GlobalMetricError` naming the case it failed on.  (Never on an empty list: the
    engine does not call the global metric with nothing to score.)"""
    if is_mean(metric) or not results:
        return
    assert metric is not None
    errored = [MetricResult(0.0, "error: check", {"error": True}) for _ in results]
    cases = {
        "the first results": list(results),
        "a one-example batch": list(results[:1]),
        "a batch with only right answers": [r for r in results if r.score >= 1.0],
        "a batch with only wrong answers": [r for r in results if r.score < 1.0],
        "a batch where every example errored": errored,
    }
    for what, batch in cases.items():
        if batch:
            checked_global(metric, batch, f"{what} (checked before the first call)")


def global_scores(metric: GlobalMetric, results: list[IndexedResult]) -> tuple[float, float]:
    """(score over the scored examples, conservative score), in dataset order; an
    errored example enters the conservative one as ``MetricResult(0.0, "error: ...")``."""
    results.sort(key=lambda item: item[0])
    scored = [r for _, r, _ in results if r is not None]
    failed = [
        r if r is not None else MetricResult(0.0, f"error: {m}", {"error": True})
        for _, r, m in results
    ]
    score = checked_global(metric, scored, "the scored results") if scored else math.nan
    return score, checked_global(metric, failed, "the results with errors as failures")


def conservative_score(outcomes: Sequence[Outcome], global_metric: GlobalMetric | None) -> float:
    """The conservative score of a full set of outcomes (dataset order), computed exactly
    as `evaluate` computes it, so a number built from merged outcomes compares with an
    evaluation's bit for bit."""
    if is_mean(global_metric):
        tally = Tally(len(outcomes), None)
        for outcome in outcomes:
            tally.add(outcome)
        return tally.conservative_mean()
    assert global_metric is not None
    results = [
        (o.index, o.result, o.error.message if o.error is not None else "") for o in outcomes
    ]
    return global_scores(global_metric, results)[1]


def evaluation_summary(evaluation: Evaluation) -> dict[str, Any]:
    """The fields of the ``evaluation.finished`` event."""
    return {
        "score": evaluation.score,
        "conservative_score": evaluation.conservative_score,
        "done": evaluation.completed,
        "total": evaluation.total,
        "errors": evaluation.errors,
        "calls": evaluation.calls,
        "cache_hits": evaluation.cache_hits,
        "retries": evaluation.retries,
        "timeouts": evaluation.timeouts,
        "truncated": evaluation.truncated,
        "hedges": evaluation.hedges,
        "tokens": evaluation.usage.total_tokens,
        "wall_time": round(evaluation.wall_time, 3),
        "stopped_early": evaluation.stopped_early,
        "upper_bound": evaluation.upper_bound,
    }
