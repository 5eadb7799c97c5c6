"""`RetryPolicy`: which failures are retried, how long to wait, when to give up."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .._errors import ConfigError, ProviderError
from ._hedge import HedgeAfter, check_hedge_after

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """How one call is retried.

    Parameters:
        max_attempts: attempts per call, the first one included.
        base_delay: first backoff ceiling in seconds; doubles each attempt.
        max_delay: cap of the backoff ceiling.
        timeout: seconds one attempt may take before it counts as a transient failure.
        deadline: seconds one call may take across all its attempts and waits
            (the pause gate included); ``None`` means attempts alone bound it.
        max_retry_after: the longest Retry-After the endpoint will honour, in seconds.
            A provider asking for more fails the affected calls with `RateLimitedError`
            naming the requested wait; raise the cap to wait (the pause is announced).
        circuit_breaker: consecutive connection failures (nothing listening, unknown
            host) with no success since, after which the endpoint opens and every call
            fails at once with `EndpointUnreachableError`; ``None`` disables it.
        hedge_after: hedged requests, off by default: an attempt still unanswered after
            this many seconds (or ``"p95"``: the endpoint's observed p95 latency) gets one
            duplicate; the first answer wins, the other is cancelled.  Both pass the
            limiter and are charged to the budget (see ``engine/endpoint/_hedge.py``).

    Only `ProviderError`s whose class is ``retryable`` are retried (rate limits, 5xx,
    timeouts, dropped connections, malformed bodies); 400/401/404 never are.  The wait
    is full-jitter exponential (``uniform(0, min(max_delay, base_delay * 2**n))``); a
    rate limit's Retry-After is honoured by the endpoint's shared pause gate, so the
    jitter only spreads the workers out after the pause.
    """

    max_attempts: int = 8
    base_delay: float = 0.5
    max_delay: float = 30.0
    timeout: float | None = 120.0
    deadline: float | None = None
    max_retry_after: float = 60.0
    circuit_breaker: int | None = 10
    hedge_after: HedgeAfter = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("RetryPolicy.max_attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ConfigError("RetryPolicy delays must not be negative")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError("RetryPolicy.timeout must be positive or None")
        if self.deadline is not None and self.deadline <= 0:
            raise ConfigError("RetryPolicy.deadline must be positive or None")
        if not self.max_retry_after >= 0:
            raise ConfigError("RetryPolicy.max_retry_after must not be negative")
        if self.circuit_breaker is not None and self.circuit_breaker < 1:
            raise ConfigError("RetryPolicy.circuit_breaker must be at least 1 or None")
        check_hedge_after(self.hedge_after)

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether ``error`` on attempt number ``attempt`` (1-based) deserves another
        (never past the error's own ``attempt_cap``: an answer that will not parse)."""
        if not isinstance(error, ProviderError) or not error.retryable:
            return False
        cap = error.attempt_cap
        return attempt < (self.max_attempts if cap is None else min(cap, self.max_attempts))

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return rng.uniform(0.0, ceiling)
