"""Rate limiting for one model endpoint: concurrency, RPM, TPM and a shared pause gate.

Usage::

    limiter = RateLimiter(Limits(rpm=3000, tpm=1_000_000, concurrency=64))
    async with limiter.slot(estimated_tokens=800):
        completion = await model.complete(...)
    limiter.reconcile(estimated=800, actual=completion.usage.total_tokens)

Requests and tokens are two leaky buckets (aiolimiter).  aiolimiter lets a whole bucket
through as one burst, so the request bucket holds only ``burst`` requests and drains at
``rpm / 60`` per second: any one-second window then sees at most ``rpm/60 + burst``.
A 429 with Retry-After closes the pause gate for *every* worker of the endpoint.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from aiolimiter import AsyncLimiter

from .._clock import Clock, loop_time
from .._errors import ConfigError
from .._types import RateLimitSnapshot
from ._adaptive import AdaptiveConcurrency

__all__ = ["LimiterStatistics", "Limits", "RateLimiter"]

# Limits learned from response headers are applied a little under the provider's own
# figure so clock skew between the two buckets does not turn into 429s.
_LEARNED_MARGIN = 0.95


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Limits of one model endpoint.

    Parameters:
        rpm: requests per minute, or ``None`` for no request limit (or learn it from
            ``x-ratelimit-limit-requests`` headers, see `RateLimiter.observe`).
        tpm: tokens per minute (prompt + completion, estimated before the call and
            reconciled with the usage the provider reports), or ``None``.
        concurrency: calls in flight at once: a ceiling when ``adaptive_concurrency``.
        adaptive_concurrency: below ``concurrency``, follow what the server really
            serves at a time, learned from round trips (`AdaptiveConcurrency`): a local
            model server that queues gets about what it serves, and no call waits out
            its timeout in its queue.  A server that does not queue keeps the ceiling.
            ``False``: always ``concurrency`` in flight.
        burst: requests admitted back to back from an idle bucket; defaults to a tenth
            of a second's worth of ``rpm`` (at least 1).
    """

    rpm: float | None = None
    tpm: float | None = None
    concurrency: int = 32
    burst: float | None = None
    adaptive_concurrency: bool = True

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "burst"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not value > 0):
                raise ConfigError(f"Limits.{name} must be a positive number or None, got {value!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ConfigError(
                f"Limits.concurrency must be a positive int, got {self.concurrency!r}"
            )

    def request_burst(self, rpm: float) -> float:
        return self.burst if self.burst is not None else max(1.0, rpm / 600.0)


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """Live state of a `RateLimiter`."""

    in_flight: int
    concurrency: int
    rpm: float | None
    tpm: float | None
    paused_for: float
    pauses: int
    learned: bool
    announced: RateLimitSnapshot | None = None  # the provider's last x-ratelimit-* headers
    level: int | None = None  # the adaptive level in force (None: adaptive is off)
    serves: float | None = None  # the server's requests at a time, once seen queueing


def _bucket(per_minute: float, capacity: float) -> AsyncLimiter:
    # capacity units drain at per_minute/60 per second
    return AsyncLimiter(capacity, capacity / (per_minute / 60.0))


class _Pacer:
    """Spaces request starts ``interval`` apart: additive increase of the rate on
    success, multiplicative decrease on a 429.  Used only while the endpoint's limit is
    unknown (not configured, not announced in headers)."""

    __slots__ = ("interval", "next_start")

    def __init__(self, interval: float) -> None:
        self.interval = interval  # seconds between request starts
        self.next_start = -math.inf  # clock time the next request may start

    async def wait(self, clock: Clock) -> None:
        now = clock()
        start = max(now, self.next_start)
        self.next_start = start + self.interval
        if start > now:
            await anyio.sleep(start - now)

    def speed_up(self) -> bool:
        """Raise the rate a little; False once pacing no longer matters (over 1000/s)."""
        rate = 1.0 / self.interval + 0.5
        self.interval = 1.0 / rate
        return rate <= 1000.0

    def back_off(self, achieved: float) -> None:
        rate = min(1.0 / self.interval, max(achieved, 0.5)) * 0.7
        self.interval = 1.0 / max(rate, 0.1)


class RateLimiter:
    """Admission control for one endpoint; shared by every evaluation that uses it."""

    __slots__ = (
        "_announced",
        "_capacity",
        "_clock",
        "_learned",
        "_limits",
        "_pacer",
        "_paused_until",
        "_pauses",
        "_recent",
        "_requests",
        "_rpm",
        "_tokens",
        "_tpm",
        "adaptive",
    )

    def __init__(self, limits: Limits | None = None, *, clock: Clock | None = None) -> None:
        self._limits = limits or Limits()
        self._clock = clock or loop_time
        self._capacity = anyio.CapacityLimiter(self._limits.concurrency)  # calls in flight
        self._rpm: float | None = None  # the request rate in force
        self._tpm: float | None = None  # the token rate in force
        self._requests: AsyncLimiter | None = None  # request bucket, None = unlimited
        self._tokens: AsyncLimiter | None = None  # token bucket, None = unlimited
        self._paused_until = -math.inf  # clock time before which nobody may send
        self._pauses = 0  # times the gate was closed or extended
        self._learned = False  # a rate came from response headers
        self._pacer: _Pacer | None = None  # AIMD pacing while no request rate is known
        self._recent: deque[float] = deque(maxlen=10_000)  # recent successes, for pacing
        self._announced: RateLimitSnapshot | None = None  # the last rate-limit headers seen
        self.adaptive = (  # the level below the ceiling, learned from round trips
            AdaptiveConcurrency(self._limits.concurrency)
            if self._limits.adaptive_concurrency
            else None
        )
        if self._limits.rpm is not None:
            self._set_rpm(self._limits.rpm)
        if self._limits.tpm is not None:
            self._set_tpm(self._limits.tpm)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def counts_tokens(self) -> bool:
        """Whether a TPM bucket is in force (configured or learned from headers)."""
        return self._tokens is not None

    def _set_rpm(self, rpm: float) -> None:
        self._rpm = rpm
        self._requests = _bucket(rpm, self._limits.request_burst(rpm))

    def _set_tpm(self, tpm: float) -> None:
        self._tpm = tpm
        self._tokens = _bucket(tpm, max(1.0, tpm / 60.0))

    # -- the pause gate ---------------------------------------------------------------
    def pause(self, seconds: float) -> bool:
        """Close the gate for every worker for ``seconds`` (extends, never shortens).

        Returns whether the gate now closes later than it did.
        """
        until = self._clock() + max(0.0, seconds)
        if until > self._paused_until:
            self._paused_until = until
            self._pauses += 1
            return True
        return False

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - self._clock())

    async def wait_until_open(self, admit: Callable[[float], None] | None = None) -> None:
        """Wait while the pause gate is closed (re-checking: it may be extended).

        ``admit(seconds)`` is told how long the wait will be before each sleep and may
        raise instead: a caller with a deadline or a cap on provider pauses gives up at
        once rather than sleeping past it.
        """
        # A sleep loop, not an Event: the deadline may move later while we sleep.
        while (delay := self._paused_until - self._clock()) > 0:
            if admit is not None:
                admit(delay)
            await anyio.sleep(delay)

    # -- admission --------------------------------------------------------------------
    async def acquire(
        self, *, estimated_tokens: int = 0, admit: Callable[[float], None] | None = None
    ) -> None:
        """Take one concurrency slot, one request and ``estimated_tokens`` of budget;
        give the slot back with `release` (or use `slot`).

        The gate is checked again after the buckets: a 429 seen by another worker while
        this one waited must still hold it back.  ``admit`` as for `wait_until_open`.
        """
        if self._paused_until != -math.inf:  # never paused: no clock to read
            await self.wait_until_open(admit)
        try:  # a free slot is taken without a trip through the event loop
            self._capacity.acquire_nowait()
        except anyio.WouldBlock:
            await self._capacity.acquire()
        try:
            if self._requests is not None:
                await self._requests.acquire()
            if self._tokens is not None and estimated_tokens > 0:
                await self._tokens.acquire(min(float(estimated_tokens), self._tokens.max_rate))
            if self._paused_until != -math.inf:
                await self.wait_until_open(admit)
            if self._pacer is not None:
                await self._pacer.wait(self._clock)
        except BaseException:
            self._capacity.release()
            raise

    def release(self) -> None:
        """Give back the concurrency slot taken by `acquire`."""
        self._capacity.release()

    @property
    def in_flight(self) -> int:
        """Slots taken now."""
        return int(self._capacity.borrowed_tokens)

    def set_level(self, level: int) -> None:
        """Allow ``level`` calls in flight (between 1 and ``Limits.concurrency``); calls
        already in flight above it finish, and no new one starts until below it."""
        self._capacity.total_tokens = max(1, min(level, self._limits.concurrency))

    @asynccontextmanager
    async def slot(
        self, *, estimated_tokens: int = 0, admit: Callable[[float], None] | None = None
    ) -> AsyncIterator[None]:
        """`acquire` ... `release` as a context manager."""
        await self.acquire(estimated_tokens=estimated_tokens, admit=admit)
        try:
            yield
        finally:
            self.release()

    # -- adapting to an endpoint that announces nothing --------------------------------
    def on_success(self) -> None:
        """A call went through: with no known request rate, let the pacing ease."""
        if self._rpm is None:
            self._recent.append(self._clock())
            if self._pacer is not None and not self._pacer.speed_up():
                self._pacer = None

    def on_rate_limited(self) -> None:
        """A 429 with no known request rate: pace requests (AIMD) instead of bursting
        every worker at the gate when it reopens."""
        if self._rpm is not None:
            return
        now = self._clock()
        while self._recent and now - self._recent[0] > 2.0:
            self._recent.popleft()
        achieved = len(self._recent) / 2.0  # calls per second that got through lately
        if self._pacer is None:
            self._pacer = _Pacer(1.0 / max(achieved, 1.0))
        else:
            self._pacer.back_off(achieved)

    async def reconcile(self, *, estimated: int, actual: int) -> None:
        """Charge tokens used beyond the estimate (spent already: the debt must be paid)."""
        extra = actual - estimated
        if self._tokens is not None and extra > 0:
            await self._tokens.acquire(min(float(extra), self._tokens.max_rate))

    def observe(self, snapshot: RateLimitSnapshot | None) -> None:
        """Learn from a response's rate-limit headers.

        Without a configured RPM/TPM, the provider's announced limit becomes the rate in
        force (slightly under it).  An exhausted remaining count closes the gate for the
        time one request (or the missing tokens) takes to come back.
        """
        if snapshot is None:
            return
        self._announced = snapshot
        if self._limits.rpm is None and snapshot.limit_requests:
            target = snapshot.limit_requests * _LEARNED_MARGIN
            if self._rpm is None or abs(self._rpm - target) > 1e-9:
                self._set_rpm(target)
                self._learned = True
                self._pacer = None  # a known rate replaces the guesswork
        if self._limits.tpm is None and snapshot.limit_tokens:
            target = snapshot.limit_tokens * _LEARNED_MARGIN
            if self._tpm is None or abs(self._tpm - target) > 1e-9:
                self._set_tpm(target)
                self._learned = True
        if snapshot.remaining_requests == 0:
            if snapshot.limit_requests:
                self.pause(60.0 / snapshot.limit_requests)
            elif snapshot.reset_requests:
                self.pause(min(snapshot.reset_requests, 1.0))

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(
            in_flight=int(self._capacity.borrowed_tokens),
            concurrency=self._limits.concurrency,
            rpm=self._rpm,
            tpm=self._tpm,
            paused_for=self.paused_for(),
            pauses=self._pauses,
            learned=self._learned,
            announced=self._announced,
            level=self.adaptive.level if self.adaptive is not None else None,
            serves=self.adaptive.serves if self.adaptive is not None else None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RateLimiter in_flight={s.in_flight}/{s.concurrency} rpm={s.rpm} tpm={s.tpm} "
            f"paused_for={s.paused_for:.2f}s pauses={s.pauses}>"
        )
