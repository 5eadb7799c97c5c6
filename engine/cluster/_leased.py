"""A worker's side of the cluster-wide rate budget: `LeasedModel`.

It wraps the worker's copy of the adapter: before every call it spends a permit from
its local lease (refilled from the endpoint's `RateBudget` actor, see `_rates`); it
reports every 429 and the latest rate-limit headers to the actor, and hands back the
permits it held unused.  The worker's `engine.Endpoint` around it keeps the retry
policy, the timeouts and the worker's share of the concurrency.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from .._errors import RateLimitedError
from .._types import Completion, RateLimitSnapshot, Usage
from ..endpoint import Limits, estimate_request_tokens
from ._rates import FREE_RECHECK, LEASE_LIFE, LEASE_SECONDS, Ask, Grant
from ._spend import SpendLease

__all__ = ["LeasedModel", "unleased"]

_DEFAULT_COMPLETION_TOKENS = 256


class LeasedModel:
    """A worker's view of a chat model under a cluster-wide `RateBudget` (actor handle).

    Takes a permit before every call (from its local lease, refilled from the actor),
    reports every 429 and the latest rate-limit headers to the actor, and otherwise
    behaves as the model it wraps.  The worker's `engine.Endpoint` around it keeps its
    retry policy, timeouts and concurrency share; the rate belongs to the actor.

    ``max_wait``: the longest cluster-wide pause a call waits for (the retry policy's
    ``max_retry_after``); a longer one fails the attempt with `RateLimitedError`.
    ``spend``: the run's budget permits (a worker's calls); a call waits for one first.
    ``limits``: the endpoint's, sent with every lease (a restarted actor takes them back).
    """

    def __init__(
        self,
        model: Any,
        budget: Any,
        *,
        name: str,
        max_wait: float,
        spend: SpendLease | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.model = model
        self.limits = limits
        self.budget = budget  # the RateBudget actor's handle
        self.spend = spend
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
        spend = self.spend
        if spend is not None:  # the run's budget first: a refused call takes no rate
            await spend.take()
        try:
            await self._take()
        except BaseException:
            if spend is not None:
                spend.unspend()  # never sent: not paid
            raise
        charged = self._lease_each
        usage: Usage | None = None
        try:
            completion: Completion = await self.model.complete(messages, **params)
            usage = completion.usage
        except RateLimitedError as exc:
            # every worker pauses, not just this one; the permits held here are stale
            self.budget.rate_limited.remote(exc.retry_after)
            self._returned += self._permits
            self._permits = 0
            self._unlimited_until = -math.inf
            raise
        finally:
            if spend is not None:
                spend.record(usage)
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
            limits=self.limits,
        )
        self._returned, self._debt, self._sent_freely, self._snapshot = 0, 0.0, 0, None
        # shielded (the actor answers at once): a grant it made must reach this side
        with anyio.CancelScope(shield=True):
            grant: Grant = await self.budget.lease.remote(ask)
        self._rate = grant.rate
        if grant.unlimited:
            self._unlimited_until = anyio.current_time() + FREE_RECHECK
        elif grant.permits:
            try:
                await anyio.sleep(grant.wait)  # reserved: they may be spent from then on
            except BaseException:  # cancelled while waiting: reserved, never used
                self._returned += grant.permits  # back with the next lease or release
                raise
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
        """Give back the permits held (the evaluation ended), the run's budget's too."""
        if self.spend is not None:
            await self.spend.release()
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


def unleased(model: Any) -> Any:
    """The adapter itself (a driver's endpoint wraps it while a cluster runs on it)."""
    return model.model if isinstance(model, LeasedModel) else model
