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

A limit announced in ``x-ratelimit-limit-*`` headers is believed until the provider
contradicts it: a 429 to a request sent under a learned rate lowers that rate below
what actually got through, and announced figures above it are ignored from then on
(Groq puts requests-per-*day* in ``limit-requests``; gateways forward upstream
headers).  A 429 always wins over a header.
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
from ._ceiling import FLOOR_RPM, RateCeiling

__all__ = ["LimiterStatistics", "Limits", "RateLimiter", "SplitBucket"]

# Limits learned from response headers are applied a little under the provider's own
# figure so clock skew between the two buckets does not turn into 429s.
_LEARNED_MARGIN = 0.95
# Successes within this many seconds measure the rate that got through.
_ACHIEVED_WINDOW = 2.0
# ... measured over at least this long (a young run's first answers come in a burst).
_ACHIEVED_MIN_SPAN = 0.25
# A learned request rate this many times below what got through is announced.
_SLOW_NOTICE = 10.0
# No provider limits anything to more than this per minute: a larger (or infinite)
# announced limit is a mistake, ignored like zero or a negative one.
_MAX_PLAUSIBLE_LIMIT = 10**12
# A pause that moves a closed gate later by less than this is the same pause.
_SAME_PAUSE = 0.25


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Limits of one model endpoint.

    Parameters:
        rpm: requests per minute, or ``None`` for no request limit (or learn it from
            ``x-ratelimit-limit-requests`` headers, see `RateLimiter.observe`).
        tpm: tokens per minute (prompt + completion, estimated before the call and
            reconciled with the usage the provider reports), or ``None``.
        input_tpm: prompt tokens per minute, for providers that limit input and output
            apart (Anthropic's ITPM); the estimate is reserved before the call and
            reconciled both ways with the reported usage.  Or learned from headers.
        output_tpm: completion tokens per minute (Anthropic's OTPM): ``max_tokens`` is
            reserved before the call (as the provider does) and what the answer did
            not use is given back after it.
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
    input_tpm: float | None = None
    output_tpm: float | None = None
    adaptive_concurrency: bool = True

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "burst", "input_tpm", "output_tpm"):
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
    input_tpm: float | None = None  # the input-token rate in force (configured or learned)
    output_tpm: float | None = None  # the output-token rate in force
    level: int | None = None  # the adaptive level in force (None: adaptive is off)
    serves: float | None = None  # the server's requests at a time, once seen queueing


def _bucket(per_minute: float, capacity: float) -> AsyncLimiter:
    # capacity units drain at per_minute/60 per second
    return AsyncLimiter(capacity, capacity / (per_minute / 60.0))


def _token_bucket(per_minute: float) -> AsyncLimiter:
    return _bucket(per_minute, max(1.0, per_minute / 60.0))  # one second's worth


def _give_back(bucket: AsyncLimiter, amount: float) -> None:
    """Return ``amount`` reserved but not used.  aiolimiter has no public refund: its
    level is lowered directly, and the next waiter woken to see the room."""
    bucket._leak()
    bucket._level = max(0.0, bucket._level - amount)
    bucket._wake_next()


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


Notices = list[tuple[str, str]]  # (kind, text): what `RateLimiter.observe` has to say


def _plausible(name: str, value: int | None, notices: Notices) -> int | None:
    """``value`` if it can be a per-minute limit, else ``None`` and a notice."""
    if value is None or 0 < value <= _MAX_PLAUSIBLE_LIMIT:
        return value
    shown = "beyond 1e12" if value > _MAX_PLAUSIBLE_LIMIT else str(value)
    notices.append(
        (f"ignored-{name}", f"ignored x-ratelimit-{name}: {shown} is not a usable limit")
    )
    return None


class RateLimiter:
    """Admission control for one endpoint; shared by every evaluation that uses it."""

    __slots__ = (
        "_announced",
        "_below_since",
        "_capacity",
        "_ceiling",
        "_clock",
        "_epoch",
        "_input",
        "_learned",
        "_limits",
        "_output",
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
        self._below_since = -math.inf  # clock time the slots were last all taken
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
        # the rule a 429 sets for a header-learned request rate (requests per minute)
        self._ceiling = RateCeiling(floor=FLOOR_RPM)
        self._epoch = 0  # bumped whenever the request rate in force changes
        self.adaptive = (  # the level below the ceiling, learned from round trips
            AdaptiveConcurrency(self._limits.concurrency)
            if self._limits.adaptive_concurrency
            else None
        )
        if self._limits.rpm is not None:
            self._set_rpm(self._limits.rpm)
        if self._limits.tpm is not None:
            self._set_tpm(self._limits.tpm)
        self._input: SplitBucket | None = None  # input tokens (ITPM), None = unlimited
        self._output: SplitBucket | None = None  # output tokens (OTPM), None = unlimited
        if self._limits.input_tpm is not None:
            self._input = SplitBucket(self._limits.input_tpm)
        if self._limits.output_tpm is not None:
            self._output = SplitBucket(self._limits.output_tpm)

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def counts_tokens(self) -> bool:
        """Whether a TPM bucket is in force (configured or learned from headers)."""
        return self._tokens is not None

    @property
    def epoch(self) -> int:
        """Changes whenever the request rate in force does: a caller notes it when it
        sends, and a 429 to a request sent under an older rate teaches nothing new."""
        return self._epoch

    @property
    def counts_split_tokens(self) -> bool:
        """Whether an input or output token bucket is in force (configured or learned)."""
        return self._input is not None or self._output is not None

    def _set_rpm(self, rpm: float) -> None:
        self._epoch += 1
        self._rpm = rpm
        self._requests = _bucket(rpm, self._limits.request_burst(rpm))

    def _set_tpm(self, tpm: float) -> None:
        self._tpm = tpm
        self._tokens = _bucket(tpm, max(1.0, tpm / 60.0))

    def rebind(self) -> None:
        """Rebuild what belongs to an event loop (the concurrency limiter, the buckets,
        times on the old loop's clock) for a new one, after the old one has ended.
        The rates in force, learned ones included, carry over."""
        self._capacity = anyio.CapacityLimiter(self._limits.concurrency)
        if self._rpm is not None:
            self._set_rpm(self._rpm)
        if self._tpm is not None:
            self._set_tpm(self._tpm)
        self._paused_until = -math.inf
        self._recent.clear()
        if self._pacer is not None:
            self._pacer.next_start = -math.inf

    # -- the pause gate ---------------------------------------------------------------
    def pause(self, seconds: float) -> bool:
        """Close the gate for every worker for ``seconds`` (extends, never shortens).

        Returns whether this is a new pause: the gate was open, or now closes at least
        a quarter of a second later than it did (a later close by less is the same
        pause, reported by another worker's request; the gate moves to it silently).
        """
        now = self._clock()
        until = now + max(0.0, seconds)
        if until <= self._paused_until:
            return False
        # The 429s of the requests in flight when the provider began refusing say the
        # same thing, each a few milliseconds later (Gemini's retryDelay is the time
        # left): one pause, not one per worker.  The gate still moves to the latest.
        same = self._paused_until > now and until - self._paused_until < _SAME_PAUSE
        self._paused_until = until
        if same:
            return False
        self._pauses += 1
        return True

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
        self,
        *,
        estimated_tokens: int = 0,
        admit: Callable[[float], None] | None = None,
        give_up_at: float | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> None:
        """Take one concurrency slot, one request and ``estimated_tokens`` of budget
        (and ``input_tokens`` / ``output_tokens`` where those are limited apart);
        give the slot back with `release` (or use `slot`).

        The gate is checked again after the buckets: a 429 seen by another worker while
        this one waited must still hold it back.  ``admit`` as for `wait_until_open`.
        ``give_up_at`` (a time on this limiter's clock) bounds the wait for the request
        and token buckets: past it, `TimeoutError`.
        """
        if self._paused_until != -math.inf:  # never paused: no clock to read
            await self.wait_until_open(admit)
        try:  # a free slot is taken without a trip through the event loop
            self._capacity.acquire_nowait()
        except anyio.WouldBlock:
            await self._capacity.acquire()
        try:
            if (
                self._requests is not None
                or (self._tokens is not None and estimated_tokens)
                or self.counts_split_tokens
            ):
                await self._take_from_buckets(
                    estimated_tokens, give_up_at, (input_tokens, output_tokens)
                )
            # Held at the gate after the bucket, every worker that waited there would
            # start at once when it reopens: a burst into the provider that just said
            # 429.  Such a worker takes a request again, so restarts go at the rate.
            held = self._paused_until != -math.inf and self.paused_for() > 0
            if self._paused_until != -math.inf:
                await self.wait_until_open(admit)
            if self._pacer is not None:
                await self._pacer.wait(self._clock)
            if held and self._requests is not None:
                await self._take_from_buckets(0, give_up_at)
        except BaseException:
            self._capacity.release()
            raise

    async def _take_from_buckets(
        self, estimated_tokens: int, give_up_at: float | None, split: tuple[int, int] = (0, 0)
    ) -> None:
        if give_up_at is None:  # the common case: no scope to set up
            await self._take(estimated_tokens, split)
            return
        with anyio.move_on_after(give_up_at - self._clock()) as scope:
            await self._take(estimated_tokens, split)
        if scope.cancelled_caught:
            raise TimeoutError(f"the endpoint's rate limits (rpm={self._rpm}, tpm={self._tpm})")

    async def _take(self, estimated_tokens: int, split: tuple[int, int] = (0, 0)) -> None:
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None and estimated_tokens > 0:
            await self._tokens.acquire(min(float(estimated_tokens), self._tokens.max_rate))
        if self._input is not None:
            await self._input.take(split[0])
        if self._output is not None:
            await self._output.take(split[1])

    def release(self) -> None:
        """Give back the concurrency slot taken by `acquire`."""
        capacity = self._capacity
        if capacity.borrowed_tokens >= capacity.total_tokens:
            self._below_since = self._clock()  # full until now
        capacity.release()

    def idle_for(self) -> float:
        """Seconds this endpoint has had a free slot with nobody waiting for one (0.0
        while its slots are all taken or someone waits; infinite when never full)."""
        capacity = self._capacity
        if capacity.borrowed_tokens >= capacity.total_tokens:
            return 0.0
        if capacity.statistics().tasks_waiting:
            return 0.0
        return self._clock() - self._below_since

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
        """A call went through: remember when (the rate that gets through is what a
        429 falls back to); with no known request rate, let the pacing ease."""
        if self._limits.rpm is None:
            now = self._clock()
            self._recent.append(now)
            if self._pacer is not None and not self._pacer.speed_up():
                self._pacer = None
            raised = self._ceiling.probe(now)  # a while without a 429: a little higher
            if raised is not None:
                self._set_rpm(raised)

    def _achieved(self) -> float:
        """Calls per second that got through over the last window (or since the first
        success, when the run is younger than the window)."""
        now = self._clock()
        while self._recent and now - self._recent[0] > _ACHIEVED_WINDOW:
            self._recent.popleft()
        if not self._recent:
            return 0.0
        span = min(_ACHIEVED_WINDOW, max(_ACHIEVED_MIN_SPAN, now - self._recent[0]))
        return len(self._recent) / span

    def on_rate_limited(self, sent_epoch: int | None = None) -> None:
        """A 429 to a request sent under rate epoch ``sent_epoch`` (default: now).

        A configured rate stands (the pause gate handles the 429).  A rate learned
        from headers far above what got through is proven wrong: it drops below what
        got through and stays under that ceiling whatever the headers say.  With no
        known rate, requests are paced (AIMD) instead of every worker bursting at the
        gate when it reopens.
        """
        if self._limits.rpm is not None:
            return
        if self._rpm is not None:
            achieved = self._achieved() * 60.0
            fresh = sent_epoch is None or sent_epoch == self._epoch  # not an old rate's 429
            # A header far above what gets through is wrong; once it was, every fresh
            # 429 means the ceiling is still too high.  With nothing got through lately
            # there is no measure to fall back to: the pause gate answers the 429.
            if not fresh or achieved <= 0:
                return
            lowered = self._ceiling.lower(self._rpm, achieved, self._clock())
            if lowered is not None:
                self._set_rpm(lowered)
            return
        achieved = self._achieved()
        if self._pacer is None:
            self._pacer = _Pacer(1.0 / max(achieved, 1.0))
        else:
            self._pacer.back_off(achieved)

    async def reconcile(self, *, estimated: int, actual: int) -> None:
        """Charge tokens used beyond the estimate (spent already: the debt must be paid)."""
        extra = actual - estimated
        if self._tokens is not None and extra > 0:
            await self._tokens.acquire(min(float(extra), self._tokens.max_rate))

    async def reconcile_split(
        self, *, input_estimate: int, input_actual: int, output_estimate: int, output_actual: int
    ) -> None:
        """Settle the input and output buckets with the usage the provider reported:
        charge what the reservation missed, give back what it held and went unused
        (Anthropic reserves ``max_tokens`` of OTPM and settles the same way)."""
        for bucket, estimate, actual in (
            (self._input, input_estimate, input_actual),
            (self._output, output_estimate, output_actual),
        ):
            if bucket is not None:
                await bucket.settle(estimate, actual)

    def _observe_split(self, snapshot: RateLimitSnapshot) -> None:
        """Learn the input and output token rates (Anthropic's ITPM and OTPM)."""
        if self._limits.input_tpm is None and snapshot.limit_input_tokens:
            target = snapshot.limit_input_tokens * _LEARNED_MARGIN
            if self._input is None or abs(self._input.per_minute - target) > 1e-9:
                self._input = SplitBucket(target)
                self._learned = True
        if self._limits.output_tpm is None and snapshot.limit_output_tokens:
            target = snapshot.limit_output_tokens * _LEARNED_MARGIN
            if self._output is None or abs(self._output.per_minute - target) > 1e-9:
                self._output = SplitBucket(target)
                self._learned = True

    def observe(self, snapshot: RateLimitSnapshot | None) -> Notices:
        """Learn from a response's rate-limit headers; what the caller should announce.

        Without a configured RPM/TPM, the provider's announced limit becomes the rate in
        force (slightly under it).  An exhausted remaining count closes the gate for the
        time one request (or the missing tokens) takes to come back.  A limit that is no
        rate at all (zero, negative, infinite, past any real provider's) is ignored, and
        a learned request rate far below what has been getting through is kept but
        announced: the returned ``(kind, text)`` notices say so, for a person.
        """
        if snapshot is None:
            return []
        self._announced = snapshot
        notices: Notices = []
        limit_requests = _plausible("limit-requests", snapshot.limit_requests, notices)
        limit_tokens = _plausible("limit-tokens", snapshot.limit_tokens, notices)
        if self._limits.rpm is None and limit_requests:
            self._learn_rpm(limit_requests * _LEARNED_MARGIN, notices)
        if self._limits.tpm is None and limit_tokens:
            target = limit_tokens * _LEARNED_MARGIN
            if self._tpm is None or abs(self._tpm - target) > 1e-9:
                self._set_tpm(target)
                self._learned = True
        if snapshot.limit_input_tokens or snapshot.limit_output_tokens:
            self._observe_split(snapshot)
        if snapshot.remaining_requests == 0:
            if limit_requests:
                self.pause(60.0 / limit_requests)
            elif snapshot.reset_requests:
                self.pause(min(snapshot.reset_requests, 1.0))
        return notices

    def _learn_rpm(self, target: float, notices: Notices) -> None:
        target = self._ceiling.cap(target)  # a 429 said the announced figure is wrong
        if self._rpm is not None and abs(self._rpm - target) <= 1e-9:
            return
        achieved = self._achieved() * 60.0
        if target * _SLOW_NOTICE < achieved:
            notices.append(
                (
                    "slow-limit",
                    f"the provider announces a request limit of {target / _LEARNED_MARGIN:g} "
                    f"per minute (x-ratelimit-limit-requests), {achieved / target:.0f}x slower "
                    f"than calls have been getting through ({achieved:.0f}/min); pacing to it. "
                    "Set Limits(rpm=...) to override",
                )
            )
        self._set_rpm(target)
        self._learned = True
        self._pacer = None  # a known rate replaces the guesswork

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
            input_tpm=self._input.per_minute if self._input is not None else None,
            output_tpm=self._output.per_minute if self._output is not None else None,
            level=self.adaptive.level if self.adaptive is not None else None,
            serves=self.adaptive.serves if self.adaptive is not None else None,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<RateLimiter in_flight={s.in_flight}/{s.concurrency} rpm={s.rpm} tpm={s.tpm} "
            f"paused_for={s.paused_for:.2f}s pauses={s.pauses}>"
        )


class SplitBucket:
    """One token bucket of a limit on input or output tokens alone, settled both ways.

    ``take`` reserves before the call (at most one bucket's worth, so a reservation
    larger than the bucket still goes through, alone); ``settle`` charges what the
    reservation missed, or gives back what it held and the call did not use.
    """

    __slots__ = ("bucket", "per_minute")

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.bucket = _token_bucket(per_minute)

    def charged(self, tokens: int) -> float:
        return min(float(max(tokens, 0)), self.bucket.max_rate)

    async def take(self, tokens: int) -> None:
        if tokens > 0:
            await self.bucket.acquire(self.charged(tokens))

    async def settle(self, estimate: int, actual: int) -> None:
        extra = actual - self.charged(estimate)
        if extra > 0:
            await self.bucket.acquire(min(extra, self.bucket.max_rate))
        elif extra < 0:
            _give_back(self.bucket, -extra)
