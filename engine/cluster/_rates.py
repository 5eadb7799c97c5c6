"""One rate budget per endpoint across every worker of a cluster.

The limits a user gives an adapter (``Limits(rpm=3000, tpm=...)``) hold for the whole
cluster, not per worker.  One `RateBudget` actor per endpoint owns the rate: two token
buckets (requests and tokens) of about 0.1 s of rate each, a pause gate, and what the
provider's ``x-ratelimit-*`` headers taught it.  Workers never ask it per call: each
worker's `LeasedModel` takes a *lease* of permits (about 0.1 s of rate), spends them
locally, and comes back when they run out; permits left unused for `LEASE_LIFE` seconds
(a worker stalled or done) are handed back.  So at any moment the cluster may send at
most the bucket's burst plus what the workers hold, and over any longer window no more
than the rate.

A 429 seen by any worker is reported at once: its Retry-After closes the gate for every
worker (each learns it at its next lease); without one, the gate closes for an
exponential backoff.  While no rate is known at all (none configured, no headers), a
429 starts pacing at 0.7 of the rate achieved lately, raised a little on every lease
(additive increase, multiplicative decrease), as `engine.RateLimiter` does in-process.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._errors import RateLimitedError
from .._limits import Limits
from .._tokens import estimate_request_tokens
from .._types import Completion, RateLimitSnapshot

__all__ = ["LEASE_LIFE", "Ask", "Grant", "LeasedModel", "RateBudget"]

LEASE_SECONDS = 0.1  # the rate one lease hands out
LEASE_LIFE = 1.0  # seconds an unused permit may be held before it goes back
FREE_RECHECK = 0.25  # with no rate in force, how often a worker asks (pauses, learned limits)
_LEARNED_MARGIN = 0.95  # as in engine.RateLimiter: a little under the announced limit
_DEFAULT_COMPLETION_TOKENS = 256


@dataclass(frozen=True, slots=True)
class Ask:
    """One lease request of a worker.

    ``want`` permits of one request and ``tokens_each`` tokens each; ``returned``
    permits it did not use; ``token_debt``: tokens its calls used beyond (positive) or
    below (negative) what their permits were charged; ``sent_freely``: calls it made
    while no rate was in force; ``snapshot``: the latest rate-limit headers it saw.
    """

    want: int = 1
    tokens_each: float = 0.0
    returned: int = 0
    token_debt: float = 0.0
    sent_freely: int = 0
    snapshot: RateLimitSnapshot | None = None


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
        self.counts = {"leases": 0, "requests": 0, "returned": 0, "rate_limited": 0, "pauses": 0}

    def _set_requests(self, rate: float, now: float) -> None:
        self.requests = _rebucket(self.requests, rate, self.limits.request_burst(rate * 60), now)

    def _set_tokens(self, rate: float, now: float) -> None:
        # a second's worth, as in-process
        self.tokens = _rebucket(self.tokens, rate, max(1.0, rate), now)

    # -- the lease ----------------------------------------------------------------------
    def lease(self, ask: Ask) -> Grant:
        """Hand out permits (see `Ask`), or say how long to wait."""
        now = time.monotonic()
        self.counts["leases"] += 1
        self._refill(now)
        self._give_back(ask.returned, ask.token_debt)
        if ask.sent_freely:  # calls made while no rate was in force: for pacing
            self.granted.append((now, ask.sent_freely))
        if ask.snapshot is not None:
            self.observe(ask.snapshot, now)
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

    def observe(self, snapshot: RateLimitSnapshot, now: float) -> None:
        """Learn from rate-limit headers, as `engine.RateLimiter.observe` does."""
        if self.limits.rpm is None and snapshot.limit_requests:
            target = snapshot.limit_requests * _LEARNED_MARGIN / 60.0
            if self.requests is None or self.paced or abs(self.requests.rate - target) > 1e-9:
                self._set_requests(target, now)
                self.paced = False  # a known rate replaces the guesswork
        if self.limits.tpm is None and snapshot.limit_tokens:
            target = snapshot.limit_tokens * _LEARNED_MARGIN / 60.0
            if self.tokens is None or abs(self.tokens.rate - target) > 1e-9:
                self._set_tokens(target, now)
        if snapshot.remaining_requests == 0:
            if snapshot.limit_requests:
                self._pause(now, 60.0 / snapshot.limit_requests)
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
            "paused_for": max(0.0, self.paused_until - time.monotonic()),
        }


class LeasedModel:
    """A worker's view of a chat model under a cluster-wide `RateBudget` (actor handle).

    Takes a permit before every call (from its local lease, refilled from the actor),
    reports every 429 and the latest rate-limit headers to the actor, and otherwise
    behaves as the model it wraps.  The worker's `engine.Endpoint` around it keeps its
    retry policy, timeouts and concurrency share; the rate belongs to the actor.

    ``max_wait``: the longest cluster-wide pause a call waits for (the retry policy's
    ``max_retry_after``); a longer one fails the attempt with `RateLimitedError`.
    """

    def __init__(self, model: Any, budget: Any, *, name: str, max_wait: float) -> None:
        self.model = model
        self.budget = budget  # the RateBudget actor's handle
        self.name = name
        self.max_wait = max_wait
        self._permits = 0  # request permits held
        self._leased_at = -math.inf  # when they were handed out
        self._returned = 0  # expired permits to give back with the next lease
        self._unlimited_until = -math.inf  # no rate in force: send freely until then
        self._rate: float | None = None  # the actor's request rate, per second
        self._tokens_each = 0.0  # tokens charged per permit (a running average of calls)
        self._lease_each = 0.0  # ... as charged for the permits held now
        self._debt = 0.0  # tokens used beyond what the permits were charged
        self._snapshot: RateLimitSnapshot | None = None  # headers not reported yet
        self._sent_freely = 0  # calls made under no rate since the last lease
        self._lock = anyio.Lock()  # one lease request at a time

    def response_format_sent(self, requested: Mapping[str, Any] | None) -> Any:
        resolve = getattr(self.model, "response_format_sent", None)
        return requested if resolve is None else resolve(requested)

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        if not self._tokens_each:
            self._tokens_each = float(estimate_request_tokens(messages, _completion_cap(params)))
        await self._take()
        charged = self._lease_each
        try:
            completion: Completion = await self.model.complete(messages, **params)
        except RateLimitedError as exc:
            # every worker pauses, not just this one; the permits held here are stale
            self.budget.rate_limited.remote(exc.retry_after)
            self._returned += self._permits
            self._permits = 0
            self._unlimited_until = -math.inf
            raise
        used = completion.usage.total_tokens
        if used:
            self._debt += used - charged
            self._tokens_each = 0.9 * self._tokens_each + 0.1 * used
        if completion.rate_limits is None:
            return completion
        # The headers go to the actor, which owns the rate; the worker's own endpoint
        # must not learn a second, per-worker limit from them.
        self._snapshot = completion.rate_limits
        return dataclasses.replace(completion, rate_limits=None)

    async def _take(self) -> None:
        """Spend one permit, leasing more from the actor when none is left."""
        while not self._spend():
            async with self._lock:
                if self._spend():
                    return
                await self._lease()

    def _spend(self) -> bool:
        now = anyio.current_time()
        if now < self._unlimited_until:
            self._sent_freely += 1
            return True
        if self._permits > 0 and now - self._leased_at <= LEASE_LIFE:
            self._permits -= 1
            return True
        return False

    async def _lease(self) -> None:
        now = anyio.current_time()
        if now - self._leased_at > LEASE_LIFE:  # held too long: back to the bucket
            self._returned += self._permits
            self._permits = 0
        ask = Ask(
            want=max(1, round(self._rate * LEASE_SECONDS)) if self._rate else 1,
            tokens_each=self._tokens_each,
            returned=self._returned,
            token_debt=self._debt,
            sent_freely=self._sent_freely,
            snapshot=self._snapshot,
        )
        self._returned, self._debt, self._sent_freely, self._snapshot = 0, 0.0, 0, None
        grant: Grant = await self.budget.lease.remote(ask)
        self._rate = grant.rate
        if grant.unlimited:
            self._unlimited_until = anyio.current_time() + FREE_RECHECK
        elif grant.permits:
            await anyio.sleep(grant.wait)  # reserved: they may be spent from then on
            self._permits, self._leased_at = grant.permits, anyio.current_time()
            self._lease_each = self._tokens_each
        elif grant.wait > self.max_wait:
            raise RateLimitedError(
                f"the provider paused this endpoint for {grant.wait:.0f}s (cluster-wide), "
                f"more than max_retry_after={self.max_wait:g}s",
                retry_after=grant.wait,
                endpoint=self.name,
            )
        else:
            await anyio.sleep(grant.wait)

    async def release(self) -> None:
        """Give back the permits held (the evaluation ended)."""
        async with self._lock:
            returned, debt = self._returned + self._permits, self._debt
            self._returned = self._permits = 0
            self._debt = 0.0
            if returned or debt:
                await self.budget.give_back.remote(returned, debt)


def _completion_cap(params: Mapping[str, Any]) -> int:
    cap = params.get("max_tokens") or params.get("max_completion_tokens")
    default = _DEFAULT_COMPLETION_TOKENS
    return min(cap, default) if isinstance(cap, int) else default
