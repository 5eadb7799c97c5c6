"""The run's OpenTelemetry metrics: GenAI client histograms and the engine's counters.

Names and units follow the GenAI semantic conventions where they define one
(``gen_ai.client.token.usage`` in tokens, ``gen_ai.client.operation.duration`` in
seconds); the engine's own counters are ``engine.*``, every one with the endpoint as
an attribute.  A Prometheus exporter shows them as ``gen_ai_client_token_usage_*``,
``engine_requests_total`` and so on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._errors import RateLimitedError
from .._types import Usage

__all__ = ["Instruments"]

# The conventions' advisory bucket boundaries.
_TOKEN_BUCKETS: list[float] = [
    1,
    4,
    16,
    64,
    256,
    1024,
    4096,
    16384,
    65536,
    262144,
    1048576,
    4194304,
]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48]


def _histogram(meter: Any, name: str, unit: str, description: str, buckets: list[float]) -> Any:
    try:  # bucket advice arrived in opentelemetry-api 1.23
        return meter.create_histogram(
            name, unit=unit, description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:
        return meter.create_histogram(name, unit=unit, description=description)


class Instruments:
    """The instruments of one meter, and what each engine occurrence records."""

    __slots__ = (
        "cache_hits",
        "cache_misses",
        "cost",
        "duration",
        "errored",
        "pauses",
        "rate_limited",
        "requests",
        "scored",
        "tokens",
    )

    def __init__(self, meter: Any) -> None:
        self.tokens = _histogram(
            meter, "gen_ai.client.token.usage", "{token}", "Tokens used per call", _TOKEN_BUCKETS
        )
        self.duration = _histogram(
            meter,
            "gen_ai.client.operation.duration",
            "s",
            "Duration of one provider attempt",
            _DURATION_BUCKETS,
        )
        counter = meter.create_counter
        self.requests = counter("engine.requests", unit="{request}", description="Attempts sent")
        self.rate_limited = counter(
            "engine.rate_limited", unit="{request}", description="Attempts answered 429"
        )
        self.pauses = counter("engine.pauses", unit="{pause}", description="Provider pauses")
        self.cache_hits = counter("engine.cache.hits", unit="{example}", description="Cache hits")
        self.cache_misses = counter(
            "engine.cache.misses", unit="{example}", description="Examples that needed a call"
        )
        self.cost = counter("engine.cost", unit="USD", description="Estimated cost of answers")
        self.scored = counter("engine.examples.scored", unit="{example}", description="Scored")
        self.errored = counter(
            "engine.examples.errored", unit="{example}", description="Ended with an error"
        )

    def attempt(
        self, common: Mapping[str, Any], seconds: float, error: BaseException | None
    ) -> None:
        """One attempt sent: its duration, and a 429 when it was one."""
        attributes = dict(common)
        if error is not None:
            attributes["error.type"] = type(error).__qualname__
        self.requests.add(1, attributes)
        self.duration.record(seconds, attributes)
        if isinstance(error, RateLimitedError):
            self.rate_limited.add(1, common)

    def answer(self, common: Mapping[str, Any], usage: Usage, cost: float | None) -> None:
        """One answer: its tokens and, when the model has a price, its cost."""
        self.tokens.record(usage.prompt_tokens, {**common, "gen_ai.token.type": "input"})
        self.tokens.record(usage.completion_tokens, {**common, "gen_ai.token.type": "output"})
        if cost is not None:
            self.cost.add(cost, common)

    def evaluation(self, endpoint: str | None, data: Mapping[str, Any]) -> None:
        """One finished evaluation (its ``evaluation.finished`` event)."""
        attributes = {"engine.endpoint": endpoint or ""}
        done, errors, hits = (int(data.get(k) or 0) for k in ("done", "errors", "cache_hits"))
        self.scored.add(done - errors, attributes)
        self.errored.add(errors, attributes)
        self.cache_hits.add(hits, attributes)
        self.cache_misses.add(max(0, done - hits), attributes)

    def pause(self, endpoint: str) -> None:
        self.pauses.add(1, {"engine.endpoint": endpoint})
