"""Hedged requests: one duplicate attempt for a call still running past a delay.

Opt-in (``RetryPolicy(hedge_after=...)``), never on by default.  A call whose attempt is
still unanswered ``hedge_after`` seconds after it started (or past the endpoint's
observed p95 latency, ``hedge_after="p95"``) sends one duplicate attempt; the first
answer wins and the other attempt is cancelled.  Both attempts go through the
endpoint's limiter (a concurrency slot, a request and the estimated tokens) and both
are charged to the run's budget: a hedge is a real request and is paid as one.

Where latency has a heavy tail (a few requests take ten times the median) a run ends
when its slowest request does; a duplicate sent past the p95 is a fresh draw, and
usually answers long before the straggler would have.  At most one duplicate per
attempt, so the extra requests are bounded by the share of attempts past the delay
(about 5% at the p95).

The p95 is the Kaplan-Meier estimate over the latencies of recent first attempts,
censored ones included: an attempt beaten by its duplicate, or still running, is known
only to take *at least* what it has run so far.  Counting only the answers would
estimate from the fast ones (the first answers of a run are its fastest, and hedging
cuts the slow ones short), and the delay would sink until everything is hedged; with
the censored ones counted, there is no estimate (nothing is hedged) until the data
shows where 95% of the calls have answered, and at least `MIN_SAMPLES` have.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from .._clock import Clock
from .._errors import ConfigError, ProviderError
from .._types import Completion

__all__ = ["MIN_SAMPLES", "HedgeAfter", "Hedger", "check_hedge_after"]

HedgeAfter = float | Literal["p95"] | None
"""Seconds, ``"p95"`` (the endpoint's observed p95 latency) or ``None`` (off)."""

MIN_SAMPLES = 20
"""Latencies seen before ``hedge_after="p95"`` hedges anything."""

_WINDOW = 512  # the most recent first-attempt latencies the p95 is taken over
_REFRESH = 16  # observations between two recomputations of the p95


def check_hedge_after(value: object) -> None:
    """Raise `ConfigError` unless ``value`` is ``None``, ``"p95"`` or positive seconds."""
    if value is None or value == "p95":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(
            f'RetryPolicy.hedge_after must be positive seconds, "p95" or None, got {value!r}'
        )
    if math.isinf(value):
        raise ConfigError("RetryPolicy.hedge_after must be finite (None turns hedging off)")


class _Race:
    """Two attempts of one call: the first answer, else the first attempt's error."""

    __slots__ = ("errors", "launched", "winner", "won_by")

    def __init__(self) -> None:
        self.winner: Completion | None = None
        self.won_by = -1
        self.errors: dict[int, BaseException] = {}
        self.launched = 1

    async def run(
        self, attempt: Callable[[], Awaitable[Completion]], index: int, scope: anyio.CancelScope
    ) -> None:
        try:
            completion = await attempt()
        except Exception as exc:  # kept, raised unwrapped by the caller (no group)
            self.errors[index] = exc
            if index == 1:
                if not (isinstance(exc, ProviderError) and exc.sent):
                    self.launched = 1  # refused before it went out: no duplicate was sent
                if 0 not in self.errors:
                    return  # the first attempt may still answer
            elif self.launched == 2 and 1 not in self.errors and isinstance(exc, ProviderError):
                return  # the duplicate may still answer
            scope.cancel()
            return
        if self.winner is None:
            self.winner, self.won_by = completion, index
            scope.cancel()  # the other attempt, or the wait before the duplicate


class Hedger:
    """An endpoint's hedging: when to send the duplicate, and the latencies behind it.

    Parameters:
        after: seconds, or ``"p95"``.
        clock: the endpoint's clock.
    """

    __slots__ = (
        "_cached",
        "_clock",
        "_fresh",
        "_next",
        "_running",
        "_samples",
        "after",
        "sent",
        "won",
    )

    def __init__(self, after: float | Literal["p95"], clock: Clock) -> None:
        check_hedge_after(after)
        self.after = after
        self._clock = clock
        self._samples: list[tuple[float, bool]] = []  # (seconds, answered) of first attempts
        self._next = 0  # where the next sample goes once the window is full
        self._fresh = 0  # samples since the p95 was last computed
        self._cached: float | None = None
        self._running: dict[int, float] = {}  # first attempts in flight: id -> start
        self.sent = 0  # duplicates sent
        self.won = 0  # duplicates that answered first

    def delay(self) -> float | None:
        """Seconds after which a running attempt gets its duplicate (None: not yet)."""
        if self.after != "p95":
            return float(self.after)
        if self._fresh >= _REFRESH or (self._cached is None and self._fresh > 0):
            self._cached = self._p95()
            self._fresh = 0
        return self._cached

    def _p95(self) -> float | None:
        """The Kaplan-Meier p95 of first-attempt latency, or None while unknown."""
        now = self._clock()
        times = self._samples + [(now - start, False) for start in self._running.values()]
        if sum(answered for _, answered in times) < MIN_SAMPLES:
            return None
        times.sort(key=lambda t: (t[0], not t[1]))  # an answer before a censoring tie
        survival, at_risk = 1.0, len(times)
        for seconds, answered in times:
            if answered:
                survival *= 1.0 - 1.0 / at_risk
                if survival <= 0.05:
                    return seconds
            at_risk -= 1
        return None  # the slowest 5% have not shown themselves yet

    def observe(self, seconds: float, answered: bool = True) -> None:
        """Record one first attempt's latency (``answered=False``: it took at least
        ``seconds``, then its duplicate won or it failed)."""
        if len(self._samples) < _WINDOW:
            self._samples.append((seconds, answered))
        else:
            self._samples[self._next] = (seconds, answered)
            self._next = (self._next + 1) % _WINDOW
        self._fresh += 1

    async def attempt(
        self,
        attempt: Callable[[], Awaitable[Completion]],
        sent: Callable[[int, int], None],
    ) -> Completion:
        """Run ``attempt`` (one attempt under the limits), hedged, and the completion.
        ``sent(duplicates, won)`` is told what went out (0 or 1 duplicate, and whether it
        answered first) before this returns or raises.  Raises the first attempt's error
        when no attempt answered (the duplicate's when the first never went out)."""
        delay = self.delay()
        started = self._clock()
        key = id(attempt)
        self._running[key] = started
        try:
            if delay is None:
                completion = await attempt()
                self.observe(self._clock() - started)
                return completion
            race = _Race()
            async with anyio.create_task_group() as tg:
                tg.start_soon(race.run, attempt, 0, tg.cancel_scope)
                await anyio.sleep(delay)
                race.launched = 2
                tg.start_soon(race.run, attempt, 1, tg.cancel_scope)
        except BaseException:
            self.observe(self._clock() - started, answered=False)
            raise
        finally:
            del self._running[key]
        # the first attempt's latency, or how long it ran before the duplicate won
        self.observe(self._clock() - started, answered=race.won_by == 0)
        hedges, won = race.launched - 1, int(race.won_by == 1)
        self.sent += hedges
        self.won += won
        sent(hedges, won)
        if race.winner is None:
            raise race.errors.get(0) or race.errors[1]
        return race.winner
