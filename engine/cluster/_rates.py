"""One rate budget per endpoint across every worker of a cluster.

The limits a user gives an adapter (``Limits(rpm=3000, tpm=...)``) hold for the whole
cluster, not per worker.  One `RateBudget` actor per endpoint owns the rate: a request
bucket holding the endpoint's burst (0.1 s of rate by default) and a token bucket
holding a second's worth (as `engine.RateLimiter` in-process), a pause gate, and what
the provider's ``x-ratelimit-*`` headers taught it.  Workers never ask it per call: each
worker's `LeasedModel` (`_leased`) takes a *lease* of permits (about 0.1 s of rate) and
spends them locally.  A lease reserves its permits in order (the buckets go into debt
and the lease says when its permits are covered), so workers wait instead of polling;
nothing is reserved more than `LEASE_LIFE` ahead, and permits a worker held unused that
long go back.  So the cluster sends at most the burst plus what the workers hold at
once, and over any longer window no more than the rate.

A 429 seen by any worker is reported at once: its Retry-After closes the gate for every
worker (each learns it at its next lease: within `FREE_RECHECK` when no rate is in
force); without one, the gate closes for an exponential backoff.  While no rate is
known at all (none configured, no headers), a 429 starts pacing at 0.7 of the rate
achieved lately, raised a little on every lease (additive increase, multiplicative
decrease), as `engine.RateLimiter` does in-process.

Headers are held to the in-process limiter's rules too: a limit that is no rate at all
(zero, negative, past any real provider's) is ignored and said in ``notices``; a 429
under a header-learned request rate far above what was granted lately proves the
header wrong: the rate drops below that and stays under the ceiling whatever later
headers say (the one rule of both, `engine.endpoint.RateCeiling`, in requests/s here).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .._types import RateLimitSnapshot
from ..endpoint import FLOOR_RPM, Limits, RateCeiling, _plausible

__all__ = ["FREE_RECHECK", "LEASE_LIFE", "LEASE_SECONDS", "Ask", "Grant", "RateBudget"]

LEASE_SECONDS = 0.1  # the rate one lease hands out
LEASE_LIFE = 1.0  # seconds an unused permit may be held before it goes back
FREE_RECHECK = 0.25  # with no rate in force, how often a worker asks (pauses, learned limits)
_LEARNED_MARGIN = 0.95  # as in engine.RateLimiter: a little under the announced limit
_DEFAULT_COMPLETION_TOKENS = 256
_ACHIEVED_WINDOW = 2.0  # seconds of grants that measure the rate that got through


@dataclass(frozen=True, slots=True)
class Ask:
    """One lease request of a worker.

    ``want`` permits of one request and ``tokens_each`` tokens each; ``returned``
    permits it did not use; ``token_debt``: tokens its calls used beyond (positive) or
    below (negative) what their permits were charged; ``sent_freely``: calls it made
    while no rate was in force; ``snapshot``: the latest rate-limit headers it saw;
    ``limits``: the endpoint's `Limits`, which a restarted actor takes back (Ray makes
    it again with the arguments it was first made with, a reused spare's old ones).
    """

    want: int = 1
    tokens_each: float = 0.0
    returned: int = 0
    token_debt: float = 0.0
    sent_freely: int = 0
    snapshot: RateLimitSnapshot | None = None
    limits: Limits | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """The answer to one lease: permits and the wait before the first may be spent, or
    no permits and the wait before asking again.

    Each permit is one request and the tokens per request that were asked for.
    ``unlimited``: no rate is in force, send freely (and ask again within `LEASE_LIFE`,
    so a rate learned meanwhile takes effect).  ``rate`` is the permit rate in force
    (per second), to size the next lease; ``paused`` is the time left on the gate.
    """

    permits: int
    wait: float
    unlimited: bool = False
    rate: float | None = None
    paused: float = 0.0


class _Bucket:
    """A token bucket on the actor's clock: ``rate`` per second up to ``capacity``."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level, self.stamp = capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is in the bucket (it may be in debt)."""
        return max(0.0, (amount - self.level) / self.rate)


def _rebucket(old: _Bucket | None, rate: float, capacity: float, now: float) -> _Bucket:
    """A bucket at a new rate that keeps what the old one held (never refills it)."""
    bucket = _Bucket(rate, capacity, now)
    if old is not None:
        old.refill(now)
        bucket.level = min(capacity, old.level)
    return bucket


class RateBudget:
    """The cluster-wide rate of one endpoint (the body of a Ray actor).

    Parameters:
        limits: the endpoint's `Limits`; ``rpm``, ``tpm`` and ``burst`` are used.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        now = time.monotonic()
        self.requests: _Bucket | None = None
        self.tokens: _Bucket | None = None
        if limits.rpm is not None:
            self._set_requests(limits.rpm / 60.0, now)
        if limits.tpm is not None:
            self._set_tokens(limits.tpm / 60.0, now)
        self.paused_until = 0.0
        self.paced = False  # the request rate is a guess made after 429s
        self.consecutive_429 = 0
        self.last_429 = -math.inf
        self.granted: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, requests)
        # the rule a 429 sets for a header-learned request rate (requests per second)
        self.ceiling = RateCeiling(floor=FLOOR_RPM / 60.0)
        self.notices: deque[str] = deque(maxlen=16)  # headers ignored, for a person
        self.counts = {"leases": 0, "requests": 0, "returned": 0, "rate_limited": 0, "pauses": 0}

    def reset(self, limits: Limits) -> None:
        """Start over as the budget of a new endpoint (this actor's was dropped)."""
        self.__init__(limits)  # type: ignore[misc]

    def _set_requests(self, rate: float, now: float) -> None:
        self.requests = _rebucket(self.requests, rate, self.limits.request_burst(rate * 60), now)

    def _set_tokens(self, rate: float, now: float) -> None:
        # a second's worth, as in-process
        self.tokens = _rebucket(self.tokens, rate, max(1.0, rate), now)

    # -- the lease ----------------------------------------------------------------------
    def lease(self, ask: Ask) -> Grant:
        """Hand out permits (see `Ask`), or say how long to wait."""
        if ask.limits is not None and ask.limits != self.limits:
            # restarted after its process died, as the actor it was first made: what
            # it learned is gone anyway, and its limits are the endpoint's it serves
            self.reset(ask.limits)
        now = time.monotonic()
        self.counts["leases"] += 1
        self._refill(now)
        self._give_back(ask.returned, ask.token_debt)
        if ask.sent_freely:  # calls made while no rate was in force: for pacing
            self.granted.append((now, ask.sent_freely))
        if ask.snapshot is not None:
            self.observe(ask.snapshot, now)
        self._probe(now)
        paused = max(0.0, self.paused_until - now)
        rate = self._permit_rate(ask.tokens_each)
        if paused > 0:
            return Grant(0, paused, rate=rate, paused=paused)
        if self.requests is None and self.tokens is None:
            return Grant(0, 0.0, unlimited=True)
        count, wait = self._take(max(1, ask.want), max(0.0, ask.tokens_each))
        if count and self.paced:
            self._speed_up(count)
        return Grant(count, wait, rate=rate)

    def _permit_rate(self, tokens_each: float) -> float | None:
        """Permits per second the buckets allow (requests, or tokens per request)."""
        rates = [self.requests.rate] if self.requests is not None else []
        if self.tokens is not None and tokens_each > 0:
            rates.append(self.tokens.rate / tokens_each)
        return min(rates) if rates else None

    def _refill(self, now: float) -> None:
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)

    def _give_back(self, returned: int, token_debt: float) -> None:
        if returned > 0 and self.requests is not None:
            self.counts["returned"] += returned
            self.requests.level = min(self.requests.capacity, self.requests.level + returned)
        if self.tokens is not None and token_debt:
            # used beyond the estimate: spent already, so the bucket owes it (may go
            # negative); below it: handed back, up to the capacity
            self.tokens.level = min(self.tokens.capacity, self.tokens.level - token_debt)

    def _take(self, want: int, tokens_each: float) -> tuple[int, float]:
        """Reserve up to ``want`` permits and say when they are all covered by the rate
        (the buckets go into debt, so leases queue in order instead of polling).
        Nothing is reserved further than `LEASE_LIFE` ahead: past that, 0 permits and
        the wait before asking again."""
        each = min(tokens_each, self.tokens.capacity) if self.tokens is not None else 0.0
        count = want
        for bucket, amount in ((self.requests, 1.0), (self.tokens, each)):
            if bucket is not None and amount > 0:
                count = min(count, int((bucket.level + bucket.rate * LEASE_LIFE) // amount))
        if count < 1:
            wait = 0.0
            for bucket, amount in ((self.requests, 1.0), (self.tokens, each)):
                if bucket is not None and amount > 0:
                    wait = max(wait, bucket.wait_for(amount) - LEASE_LIFE)
            return 0, max(wait, 0.001)
        wait = 0.0
        for bucket, amount in ((self.requests, 1.0), (self.tokens, each)):
            if bucket is not None and amount > 0:
                bucket.level -= count * amount
                wait = max(wait, bucket.wait_for(0.0))
        self.counts["requests"] += count
        self.granted.append((time.monotonic(), count))
        return count, wait

    def give_back(self, returned: int, token_debt: float) -> None:
        """Permits a worker no longer needs (its evaluation ended), and its token debt."""
        self._refill(time.monotonic())
        self._give_back(returned, token_debt)

    # -- what the provider says -----------------------------------------------------------
    def rate_limited(self, retry_after: float | None) -> float:
        """A worker got a 429: close the gate for every worker; returns the pause."""
        now = time.monotonic()
        self.counts["rate_limited"] += 1
        self.consecutive_429 = self.consecutive_429 + 1 if now - self.last_429 < 5.0 else 1
        self.last_429 = now
        if self.limits.rpm is None and (self.requests is None or self.paced):
            self._back_off(now)
        elif self.limits.rpm is None:
            self._lower_learned(now)
        if retry_after is not None:
            seconds = retry_after
        else:  # no Retry-After: back off the whole endpoint, exponentially in a row
            seconds = min(30.0, 0.5 * 2 ** (self.consecutive_429 - 1))
        self._pause(now, seconds)
        return seconds

    def _pause(self, now: float, seconds: float) -> None:
        if now + seconds > self.paused_until:
            self.paused_until = now + seconds
            self.counts["pauses"] += 1

    def _lower_learned(self, now: float) -> None:
        """A 429 under a header-learned request rate: if the header is far above what
        got through (or a ceiling is still too high), drop under it and keep a ceiling
        that headers cannot lift.  Otherwise the pause gate answers the 429."""
        if self.requests is None:
            return
        # what was granted lately stands for what got through (workers report no answers)
        recent = sum(n for t, n in self.granted if now - t <= _ACHIEVED_WINDOW)
        achieved = recent / _ACHIEVED_WINDOW
        if achieved <= 0:
            return  # nothing got through lately: no measure to fall back to
        lowered = self.ceiling.lower(self.requests.rate, achieved, now)
        if lowered is not None:
            self._set_requests(lowered, now)

    def _probe(self, now: float) -> None:
        """Under a ceiling, a while without a 429 raises it a little (headers never do)."""
        target = self.ceiling.probe(now)
        if target is None:
            return
        if self.requests is not None and abs(self.requests.rate - target) > 1e-9:
            self._set_requests(target, now)

    def observe(self, snapshot: RateLimitSnapshot, now: float) -> None:
        """Learn from rate-limit headers, as `engine.RateLimiter.observe` does: a limit
        that is no rate is ignored (kept in ``notices``), and a ceiling a 429 set holds."""
        found: list[tuple[str, str]] = []
        limit_requests = _plausible("limit-requests", snapshot.limit_requests, found)
        limit_tokens = _plausible("limit-tokens", snapshot.limit_tokens, found)
        # every response carries the same headers: each notice once
        self.notices.extend(text for _, text in found if text not in self.notices)
        if self.limits.rpm is None and limit_requests:
            # held under the ceiling: a 429 said the announced figure is wrong
            target = self.ceiling.cap(limit_requests * _LEARNED_MARGIN / 60.0)
            if self.requests is None or self.paced or abs(self.requests.rate - target) > 1e-9:
                self._set_requests(target, now)
                self.paced = False  # a known rate replaces the guesswork
        if self.limits.tpm is None and limit_tokens:
            target = limit_tokens * _LEARNED_MARGIN / 60.0
            if self.tokens is None or abs(self.tokens.rate - target) > 1e-9:
                self._set_tokens(target, now)
        if snapshot.remaining_requests == 0:
            if limit_requests:
                self._pause(now, 60.0 / limit_requests)
            elif snapshot.reset_requests:
                self._pause(now, min(snapshot.reset_requests, 1.0))

    # -- pacing while no rate is known ------------------------------------------------
    def _back_off(self, now: float) -> None:
        recent = sum(n for t, n in self.granted if now - t <= 2.0)
        achieved = recent / 2.0
        current = self.requests.rate if self.requests is not None else achieved
        self._set_requests(max(0.5, min(current, max(achieved, 0.5)) * 0.7), now)
        self.paced = True

    def _speed_up(self, granted: int) -> None:
        assert self.requests is not None
        rate = self.requests.rate + 0.5 * granted
        if rate > 1000.0:  # pacing no longer matters
            self.requests, self.paced = None, False
        else:
            self._set_requests(rate, self.requests.stamp)

    def statistics(self) -> dict[str, Any]:
        """Counters and the rates in force (per minute)."""
        return {
            **self.counts,
            "rpm": self.requests.rate * 60.0 if self.requests is not None else None,
            "tpm": self.tokens.rate * 60.0 if self.tokens is not None else None,
            "paced": self.paced,
            "ceiling_rpm": self.ceiling.level * 60.0 if self.ceiling.level is not None else None,
            "notices": list(self.notices),
            "paused_for": max(0.0, self.paused_until - time.monotonic()),
            "pid": os.getpid(),
        }
