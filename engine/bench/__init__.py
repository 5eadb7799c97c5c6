"""Benchmark your own endpoint: the rate, latency and cost a run will really get.

``textgrad bench RUN.toml`` (or `bench_endpoint` from code) sweeps a few concurrency
levels against the run file's endpoint, sending the run's real prompt over its real
rows (cycling the dataset) or a synthetic load, through the same `Endpoint` path as
`evaluate`: the run's limits, retry policy and pause gate.  Per level it measures
requests and tokens per second, the limits the endpoint announces and the fraction of
them reached, the 429 share and Retry-After, latency percentiles, errors by class and
cost; then it projects the whole dataset and recommends the ``[model.limits]`` to use::

    report = await bench_endpoint(chat, prompt, rows, settings=BenchSettings(
        concurrency=(8, 32, 128), requests=200, max_requests=1000))
    print(report.to_table())
    print(report.recommendation.to_toml())

Hard caps (``max_requests``, ``max_cost``) count every attempt, retries included, and
are checked right before each attempt leaves: they are never exceeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._budget import Price
from .._evaluate import validate_examples
from .._prompt import Prompt
from .._protocols import ChatModel
from .._types import Example, Usage
from ..endpoint import Limits, RetryPolicy, estimate_request_tokens
from ._record import Attempt, RecordingModel, RequestCaps, completion_cap, worst_case_usage
from ._report import (
    BenchReport,
    Projection,
    Recommendation,
    best_level,
    format_table,
    project,
    recommend,
)
from ._stats import LevelResult, TimelineBucket, percentile
from ._sweep import BenchProgress, BenchSettings, RequestSource, Sweep

__all__ = [
    "Attempt",
    "BenchProgress",
    "BenchReport",
    "BenchSettings",
    "LevelResult",
    "Projection",
    "Recommendation",
    "RecordingModel",
    "RequestCaps",
    "TimelineBucket",
    "bench_endpoint",
    "best_level",
    "format_table",
    "percentile",
    "plan_bench",
    "recommend",
]

# Completion tokens assumed per request when nothing caps them (dry-run estimate only).
_UNCAPPED_COMPLETION = 256


async def bench_endpoint(
    model: ChatModel,
    prompt: Prompt,
    rows: Sequence[Example],
    *,
    settings: BenchSettings | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
    on_progress: Callable[[BenchProgress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BenchReport:
    """Sweep ``settings.concurrency`` against ``model`` and measure each level.

    ``limits`` are the run's (its rpm, tpm and burst hold at every level; the level
    replaces its concurrency); ``retry`` the run's policy; ``price`` the model's
    price, for costs and ``max_cost``.  Raises `ConfigError` for bad input before any
    call, and a fatal `ProviderError` (bad credentials, exhausted quota) at once.
    """
    settings = settings or BenchSettings()
    validate_examples(prompt, rows)
    source = RequestSource(prompt, rows, settings)
    if settings.max_cost is not None:
        worst_case_usage(source.messages(0), source.params)  # a cost cap needs a max_tokens
    caps = RequestCaps(max_requests=settings.max_requests, max_cost=settings.max_cost, price=price)
    recorder = RecordingModel(model, caps=caps, clock=clock)
    sweep = Sweep(
        recorder,
        source,
        settings,
        limits=limits,
        retry=retry,
        price=price,
        on_progress=on_progress,
        clock=clock,
    )
    levels = tuple(await sweep.run())
    best = best_level(levels)
    examples = settings.project_examples or len(rows)
    return BenchReport(
        endpoint=recorder.name,
        model=prompt.model,
        settings=settings,
        configured=limits,
        levels=levels,
        attempts=caps.attempts,
        cost_usd=caps.spent if price is not None else None,
        stopped=sweep.stopped,
        synthetic=settings.prompt_tokens is not None,
        dataset_examples=len(rows),
        best=best,
        projection=project(levels, best, examples, price),
        recommendation=recommend(levels, limits),
    )


def plan_bench(
    prompt: Prompt,
    rows: Sequence[Example],
    *,
    settings: BenchSettings | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
) -> dict[str, Any]:
    """The dry run: upper bounds of the attempts and the cost of a sweep, no call made.

    Attempts are bounded by the requests times the retry policy's attempts, by the
    configured rpm over a ``duration``, and by ``max_requests``; the cost by the worst
    case of every request that may be sent (bytes as tokens, the completion cap) and
    by ``max_cost``.  The expected cost uses the 4-characters rule and the cap.
    """
    settings = settings or BenchSettings()
    validate_examples(prompt, rows)
    source = RequestSource(prompt, rows, settings)
    attempts = _attempt_bound(settings, limits, retry or RetryPolicy())
    distinct = 1 if source.synthetic is not None else len(rows)
    samples = [source.messages(i) for i in range(min(attempts or distinct, distinct))]
    cap = completion_cap(source.params)
    completion = cap or _UNCAPPED_COMPLETION
    prompt_tokens = max(estimate_request_tokens(m, 0) for m in samples)
    worst: float | None = None
    if settings.max_cost is not None or (price is not None and cap is not None):
        worst_usage = [worst_case_usage(m, source.params) for m in samples]  # needs a cap
        worst = max(price.cost(u) for u in worst_usage) if price is not None else None
    bound = worst * attempts if worst is not None and attempts is not None else None
    if settings.max_cost is not None:
        bound = settings.max_cost if bound is None else min(bound, settings.max_cost)
    planned = settings.requests * len(settings.concurrency) if settings.duration is None else None
    expected = (
        price.cost(Usage(prompt_tokens, completion)) * planned
        if price is not None and planned is not None
        else None
    )
    return {
        "command": "bench",
        "levels": list(settings.concurrency),
        "requests_per_level": settings.requests if settings.duration is None else None,
        "duration_s": settings.duration,
        "planned_requests": planned,
        "max_attempts": attempts,
        "tokens_per_request_estimate": prompt_tokens + completion,
        "cost_per_request_upper_bound_usd": _round(worst),
        "max_cost_usd": _round(bound),
        "expected_cost_usd": _round(expected),
        "note": "max_attempts counts every retry; null means unbounded (pass --max-requests)",
    }


def _round(dollars: float | None) -> float | None:
    return round(dollars, 6) if dollars is not None else None


def _attempt_bound(
    settings: BenchSettings, limits: Limits | None, retry: RetryPolicy
) -> int | None:
    levels = len(settings.concurrency)
    bound: int | None = None
    if settings.duration is None:
        bound = settings.requests * levels * retry.max_attempts
    elif limits is not None and limits.rpm is not None:
        # every attempt takes a request from the bucket: rate x time + one burst
        per_level = settings.duration * limits.rpm / 60.0 + limits.request_burst(limits.rpm)
        bound = math.ceil(per_level) * levels
    if settings.max_requests is not None:
        bound = settings.max_requests if bound is None else min(bound, settings.max_requests)
    return bound
