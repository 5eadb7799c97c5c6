"""Hedged requests: one duplicate attempt for a call still running past a delay.

Opt-in (``RetryPolicy(hedge_after=...)``), never on by default.  A call whose attempt is
still unanswered ``hedge_after`` seconds after it started (or past the endpoint's
observed p95 latency, ``hedge_after="p95"``) sends one duplicate attempt; the first
answer wins and the other attempt is cancelled.  Both attempts go through the
endpoint's limiter (a concurrency slot, a request and the estimated tokens) and both
are charged to the run's budget: a hedge is a real request and is paid as one.  Its
tokens are not known (one of the two is cancelled, and a provider may bill it in full):
the endpoint charges each duplicate as its call's answer (`BudgetMeter.charge_hedges`),
which the run report shows apart.

Where latency has a heavy tail (a few requests take ten times the median) a run ends
when its slowest request does; a duplicate sent past the p95 is a fresh draw, and
usually answers long before the straggler would have.  At most one duplicate per
attempt, so the extra requests are bounded by the share of attempts past the delay
(about 5% at the p95).

Early on idle capacity (``"p95"`` only).  In the bulk of a run every slot is busy and a
duplicate takes one from the next example: there a hedge costs throughput, and only the
p95 is worth it.  At the end of a run (the endpoint has had a free slot with nobody
waiting for one for `IDLE_GRACE`) a duplicate costs no throughput, and the run waits on
its slowest calls: a call already past the observed p75 gets its duplicate at once.
These early duplicates are capped by a budget, as gRPC throttles its hedges: at most
`EARLY_SHARE` (2%) of the first attempts started so far plus `EARLY_ALLOWANCE` (5), so a
small run with idle slots cannot double its requests; with the p95's own ~5%, a run's
extra requests stay under 8% (4.2-7.8% over the benchmark's draws, benchmarks/hedging.py,
where the end of a 1,000-example run came 1.15-1.43x sooner than unhedged).

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

__all__ = [
    "EARLY_ALLOWANCE",
    "EARLY_SHARE",
    "IDLE_GRACE",
    "MIN_SAMPLES",
    "HedgeAfter",
    "Hedger",
    "check_hedge_after",
]

HedgeAfter = float | Literal["p95"] | None
"""Seconds, ``"p95"`` (the endpoint's observed p95 latency) or ``None`` (off)."""

MIN_SAMPLES = 20
"""Latencies seen before ``hedge_after="p95"`` hedges anything."""

EARLY_SHARE = 0.02
"""Early duplicates (sent on idle capacity) allowed per first attempt started so far..."""
EARLY_ALLOWANCE = 5
"""... plus this many: a run's first tail may use them before its share has grown."""
IDLE_GRACE = 0.05
"""Seconds the endpoint must have had a free slot, nobody waiting, before it is idle: a
slot freed in the bulk of a run is taken again at once by the next example."""

_EARLY_QUANTILE = 0.75  # on idle capacity, a call past this latency quantile is late
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
        idle_for: seconds the endpoint has had a free slot with nobody waiting (its
            limiter's `idle_for`); ``None``: never hedge early.
    """

    __slots__ = (
        "_cached",
        "_clock",
        "_early",
        "_fresh",
        "_idle_for",
        "_next",
        "_running",
        "_samples",
        "after",
        "early",
        "firsts",
        "sent",
        "won",
    )

    def __init__(
        self,
        after: float | Literal["p95"],
        clock: Clock,
        idle_for: Callable[[], float] | None = None,
    ) -> None:
        check_hedge_after(after)
        self.after = after
        self._clock = clock
        self._idle_for = idle_for  # seconds the endpoint has had idle capacity
        self._early: float | None = None  # the p75, with the p95 in ``_cached``
        self.firsts = 0  # first attempts started
        self.early = 0  # duplicates sent early, on idle capacity
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
            self._early, self._cached = self._quantiles()
            self._fresh = 0
        return self._cached

    def early_delay(self) -> float | None:
        """The observed p75: past it a call may get its duplicate early, once the
        endpoint is idle (None: hedging at fixed seconds, or not known yet)."""
        if self.after != "p95" or self._idle_for is None or self.delay() is None:
            return None
        return self._early

    def _quantiles(self) -> tuple[float | None, float | None]:
        """The Kaplan-Meier p75 and p95 of first-attempt latency (None while unknown)."""
        now = self._clock()
        times = self._samples + [(now - start, False) for start in self._running.values()]
        if sum(answered for _, answered in times) < MIN_SAMPLES:
            return None, None
        times.sort(key=lambda t: (t[0], not t[1]))  # an answer before a censoring tie
        survival, at_risk, early = 1.0, len(times), None
        for seconds, answered in times:
            if answered:
                survival *= 1.0 - 1.0 / at_risk
                if early is None and survival <= 1.0 - _EARLY_QUANTILE:
                    early = seconds
                if survival <= 0.05:
                    return early, seconds
            at_risk -= 1
        return early, None  # the slowest 5% have not shown themselves yet

    def observe(self, seconds: float, answered: bool = True) -> None:
        """Record one first attempt's latency (``answered=False``: it took at least
        ``seconds``, then its duplicate won or it failed)."""
        if len(self._samples) < _WINDOW:
            self._samples.append((seconds, answered))
        else:
            self._samples[self._next] = (seconds, answered)
            self._next = (self._next + 1) % _WINDOW
        self._fresh += 1

    async def _until_duplicate(self, started: float, delay: float) -> None:
        """Sleep until the duplicate is due: ``delay`` after ``started``, or sooner, past
        the observed p75, once the endpoint has been idle for `IDLE_GRACE` and the early
        budget (`EARLY_SHARE` of the first attempts so far + `EARLY_ALLOWANCE`) allows."""
        early = self.early_delay()
        if early is None or early >= delay:
            await anyio.sleep(delay)
            return
        assert self._idle_for is not None
        await anyio.sleep(early)
        poll = max(IDLE_GRACE, early / 4)  # while busy: how often to look again
        while True:
            left = started + delay - self._clock()
            if left <= 0:
                return
            idle = self._idle_for()
            if idle >= IDLE_GRACE:
                if self.early < EARLY_SHARE * self.firsts + EARLY_ALLOWANCE:
                    self.early += 1
                    return
                wait = poll  # the budget is spent: it grows with the first attempts
            else:  # busy, or idle for less than the grace: look again when it may be over
                wait = poll if idle <= 0 else max(IDLE_GRACE - idle, IDLE_GRACE / 8)
            await anyio.sleep(min(left, wait))
            if wait >= left:  # the delay itself is over (no float residue to loop on)
                return

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
        self.firsts += 1
        try:
            if delay is None:
                completion = await attempt()
                self.observe(self._clock() - started)
                return completion
            race = _Race()
            async with anyio.create_task_group() as tg:
                tg.start_soon(race.run, attempt, 0, tg.cancel_scope)
                await self._until_duplicate(started, delay)
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
