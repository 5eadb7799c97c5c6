"""From recorded attempts to one sweep level's figures (`LevelResult`).

Rates are measured over the *steady* part of a level (`steady_window`), so the
ramp-up (the first requests all leave at once) and the drain (the last ones finish
with nothing behind them) do not bias what a long run would sustain.
Latency is per attempt, as the adapter saw it: queueing in the limiter is not in it.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._budget import Price
from .._types import Usage
from ._record import Attempt

__all__ = ["LevelResult", "TimelineBucket", "percentile", "steady_window", "summarize_level"]

# Fewer answers than this and the whole level is the window (too few to trim).
_MIN_STEADY = 20


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, linearly interpolated between ranks.

    The same as ``statistics.quantiles(method="inclusive")`` and numpy's default.
    """
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def steady_window(starts: Sequence[float], first_end: float) -> tuple[float, float]:
    """The steady part of a level, on the start times of its answered attempts.

    It is the second half of the starts, and later still if the first answer came
    back after that: the first half holds the ramp-up (the first requests leave at
    once, as fast as slots, a limiter's burst or a reopened pause gate allow), which a
    long run pays once.  It ends at the last start: a start is never part of the drain,
    and start times carry none of the latency's jitter, unlike end times.  Returns
    ``(from, to)``; rates count the starts in ``(from, to]``; ``(0, 0)`` when there are
    too few starts to trim.
    """
    ordered = sorted(starts)
    n = len(ordered)
    if n < _MIN_STEADY:
        return 0.0, 0.0
    ramp = bisect.bisect_left(ordered, first_end)
    low = min(max(n // 2, ramp), n - _MIN_STEADY // 2)
    return ordered[low], ordered[-1]


@dataclass(frozen=True, slots=True)
class TimelineBucket:
    """One second of a level (``t`` = seconds since the level started)."""

    t: float
    answered: int
    tokens: int
    rate_limited: int
    failed: int
    p50_s: float | None
    p95_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True, slots=True)
class LevelResult:
    """What one concurrency level of the sweep measured.

    ``requests`` are answered requests (each may have taken several ``attempts``);
    ``failed`` gave up after their retries.  ``errors`` counts failed attempts by the
    engine's error class (429s included, as ``RateLimitedError``); ``error_examples``
    holds the last message of each class.  Limits are what
    the endpoint announced (``x-ratelimit-limit-*``), ``None`` when it announced none;
    ``limit_input_tokens_per_min`` / ``limit_output_tokens_per_min`` are the input and
    output token limits of a provider that limits them apart (Anthropic's ITPM and
    OTPM), reached at ``input_tokens_per_s`` / ``output_tokens_per_s`` (from usage).
    The rates are over ``steady_requests`` answers started within ``steady_s`` seconds
    (`steady_window`).  ``samples`` are ``(seconds since start, latency, error)`` per
    attempt, for plots.
    """

    concurrency: int
    planned: int | None
    requests: int
    failed: int
    attempts: int
    wall_s: float
    requests_per_s: float | None
    tokens_per_s: float | None
    steady_requests: int
    steady_s: float
    limit_requests_per_min: int | None
    limit_tokens_per_min: int | None
    fraction_of_request_limit: float | None
    fraction_of_token_limit: float | None
    share_429: float
    retry_after_max_s: float | None
    retry_after_seen: int
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    max_s: float | None
    mean_s: float | None
    errors: Mapping[str, int]
    error_examples: Mapping[str, str]
    prompt_tokens_mean: float | None
    completion_tokens_mean: float | None
    cost_usd: float | None
    cost_per_1000_usd: float | None
    stopped: str | None = None
    input_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    limit_input_tokens_per_min: int | None = None
    limit_output_tokens_per_min: int | None = None
    fraction_of_input_token_limit: float | None = None
    fraction_of_output_token_limit: float | None = None
    timeline: tuple[TimelineBucket, ...] = ()
    samples: tuple[tuple[float, float, str | None], ...] = field(default=(), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but ``samples``; ``timeline`` as a list of objects."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data.pop("samples")
        data["errors"] = dict(self.errors)
        data["error_examples"] = dict(self.error_examples)
        data["timeline"] = [bucket.to_dict() for bucket in self.timeline]
        return data


def _timeline(attempts: Sequence[Attempt], started: float) -> tuple[TimelineBucket, ...]:
    if not attempts:
        return ()
    buckets: dict[int, list[Attempt]] = {}
    for a in attempts:
        buckets.setdefault(int(max(0.0, a.end - started)), []).append(a)
    out = []
    for second in range(max(buckets) + 1):
        ended = buckets.get(second, [])
        answers = [a for a in ended if a.ok]
        latencies = [a.latency for a in answers]
        out.append(
            TimelineBucket(
                t=float(second),
                answered=len(answers),
                tokens=sum(a.usage.total_tokens for a in answers if a.usage is not None),
                rate_limited=sum(a.error == "RateLimitedError" for a in ended),
                failed=sum(not a.ok and a.error != "RateLimitedError" for a in ended),
                p50_s=percentile(latencies, 0.5),
                p95_s=percentile(latencies, 0.95),
            )
        )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class _Announced:
    """The last limits the endpoint announced in a level (per minute)."""

    requests: int | None = None
    tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


def _announced(attempts: Sequence[Attempt]) -> _Announced:
    """The last request and token limits the endpoint announced in the level: a
    header missing from one response does not erase what an earlier one said."""
    rpm = tpm = itpm = otpm = None
    for a in attempts:
        if a.rate_limits is not None:
            rpm = a.rate_limits.limit_requests or rpm
            tpm = a.rate_limits.limit_tokens or tpm
            itpm = a.rate_limits.limit_input_tokens or itpm
            otpm = a.rate_limits.limit_output_tokens or otpm
    return _Announced(rpm, tpm, itpm, otpm)


def _fraction(per_second: float | None, per_minute_limit: int | None) -> float | None:
    if per_second is None or not per_minute_limit:
        return None
    return per_second * 60.0 / per_minute_limit


@dataclass(frozen=True, slots=True)
class _Rates:
    requests_per_s: float | None = None
    tokens_per_s: float | None = None
    input_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    count: int = 0  # answers the rates are over
    seconds: float = 0.0  # the window they are over


def _rates(answers: Sequence[Attempt], started: float) -> _Rates:
    """Answers and tokens per second over the steady window; with too few answers to
    trim, over the whole level (its start to its last answer)."""
    if not answers:
        return _Rates()
    low, high = steady_window([a.start for a in answers], min(a.end for a in answers))
    chosen = [a for a in answers if low < a.start <= high]
    if high <= low or not chosen:
        low, high, chosen = started, max(a.end for a in answers), list(answers)
    if high <= low:
        return _Rates()
    usages = [a.usage for a in chosen if a.usage is not None]
    span = high - low
    return _Rates(
        requests_per_s=len(chosen) / span,
        tokens_per_s=sum(u.total_tokens for u in usages) / span,
        input_tokens_per_s=sum(u.prompt_tokens for u in usages) / span,
        output_tokens_per_s=sum(u.completion_tokens for u in usages) / span,
        count=len(chosen),
        seconds=span,
    )


def _cost(answers: Sequence[Attempt], price: Price | None) -> tuple[float | None, float | None]:
    if price is None:
        return None, None
    usage = sum((a.usage for a in answers if a.usage is not None), Usage())
    cost = price.cost(usage)
    return cost, (cost / len(answers) * 1000.0 if answers else None)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize_level(
    attempts: Sequence[Attempt],
    *,
    concurrency: int,
    planned: int | None,
    answered: int,
    failed: int,
    started: float,
    ended: float,
    price: Price | None,
    stopped: str | None = None,
) -> LevelResult:
    """Aggregate one level's attempts (``started``/``ended`` on the recorder's clock)."""
    answers = [a for a in attempts if a.ok]
    latencies = [a.latency for a in answers]
    rates = _rates(answers, started)
    limits = _announced(attempts)
    limited = [a for a in attempts if a.error == "RateLimitedError"]
    waits = [a.retry_after for a in limited if a.retry_after is not None]
    cost, per_1000 = _cost(answers, price)
    usages = [a.usage for a in answers if a.usage is not None]
    return LevelResult(
        concurrency=concurrency,
        planned=planned,
        requests=answered,
        failed=failed,
        attempts=len(attempts),
        wall_s=ended - started,
        requests_per_s=rates.requests_per_s,
        tokens_per_s=rates.tokens_per_s,
        steady_requests=rates.count,
        steady_s=rates.seconds,
        limit_requests_per_min=limits.requests,
        limit_tokens_per_min=limits.tokens,
        fraction_of_request_limit=_fraction(rates.requests_per_s, limits.requests),
        fraction_of_token_limit=_fraction(rates.tokens_per_s, limits.tokens),
        share_429=len(limited) / len(attempts) if attempts else 0.0,
        retry_after_max_s=max(waits) if waits else None,
        retry_after_seen=len(waits),
        p50_s=percentile(latencies, 0.5),
        p95_s=percentile(latencies, 0.95),
        p99_s=percentile(latencies, 0.99),
        max_s=max(latencies) if latencies else None,
        mean_s=_mean(latencies),
        errors=dict(Counter(a.error for a in attempts if a.error is not None)),
        error_examples={a.error: a.detail or "" for a in attempts if a.error is not None},
        prompt_tokens_mean=_mean([u.prompt_tokens for u in usages]),
        completion_tokens_mean=_mean([u.completion_tokens for u in usages]),
        cost_usd=cost,
        cost_per_1000_usd=per_1000,
        stopped=stopped,
        input_tokens_per_s=rates.input_tokens_per_s,
        output_tokens_per_s=rates.output_tokens_per_s,
        limit_input_tokens_per_min=limits.input_tokens,
        limit_output_tokens_per_min=limits.output_tokens,
        fraction_of_input_token_limit=_fraction(rates.input_tokens_per_s, limits.input_tokens),
        fraction_of_output_token_limit=_fraction(rates.output_tokens_per_s, limits.output_tokens),
        timeline=_timeline(attempts, started),
        samples=tuple((a.start - started, a.latency, a.error) for a in attempts),
    )
