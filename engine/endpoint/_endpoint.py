"""`Endpoint`: a chat model behind its limiter, retry policy and circuit breaker.

Every call of the engine goes through ``Endpoint.complete``: wait at the pause gate,
take a concurrency slot, a request and the estimated tokens, call with a timeout,
feed the response's rate-limit headers back, and retry retryable failures with
full-jitter backoff.  Every wait is bounded: by the call's deadline, by the policy's
cap on provider-imposed pauses, and by the circuit breaker, which fails every call at
once when nothing is listening.

One `Endpoint` per adapter object: ``Endpoint.of(model)`` returns the same endpoint for
the same model every time, so however many evaluations and optimizations share an
adapter, concurrently, they share one budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio

from .._budget import BudgetMeter
from .._clock import Clock, loop_time
from .._context import current_emitter, current_meter
from .._errors import (
    CallTimeoutError,
    ConfigError,
    ConnectionFailedError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from .._events import Emitter
from .._prompt import Prompt
from .._protocols import ChatModel
from .._types import Completion, Usage
from ..cache import request_hash
from ..tracing import attempt_span, instrumented
from ._adaptive import LevelChange, LiveAttempts
from ._breaker import CircuitBreaker
from ._hedge import Hedger
from ._limits import LimiterStatistics, Limits, RateLimiter
from ._retry import RetryPolicy
from ._tokens import estimate_request_tokens

__all__ = ["CallResult", "Endpoint", "EndpointStatistics", "estimate_request_tokens"]


# Completion-length guess before the endpoint has answered anything.
_DEFAULT_COMPLETION_TOKENS = 256
# Provider pauses at least this long are announced at info level, shorter ones at debug.
_ANNOUNCE_PAUSE = 1.0
# 429s that cost no attempt (others were answered meanwhile), per attempt the policy
# allows: generous, yet a request the provider refuses on its own account forever (one
# request over the whole TPM limit is a 429 too) still ends.
_FORGIVEN_429S_PER_ATTEMPT = 3
# The attribute under which an adapter object carries its shared endpoint.
_SHARED_ATTRIBUTE = "_engine_endpoint"


@dataclass(frozen=True, slots=True)
class CallResult:
    """A completion and what it took: attempts made (hedges included) and tokens paid
    across them, and how many of the attempts were hedges."""

    completion: Completion
    attempts: int
    timeouts: int = 0  # attempts that timed out (counted apart from other retries)
    hedges: int = 0  # duplicate attempts sent by hedging (counted in attempts)


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    """Counters of an `Endpoint` since it was made."""

    name: str
    calls: int
    succeeded: int
    failed: int
    retries: int
    rate_limited: int
    timeouts: int
    usage: Usage
    limiter: LimiterStatistics
    breaker_open: bool = False
    connection_failures: int = 0  # in a row, since the last success
    hedges: int = 0  # duplicate attempts sent (``RetryPolicy.hedge_after``)
    hedges_won: int = 0  # duplicates that answered before the attempt they doubled


class _Counters:
    __slots__ = ("calls", "failed", "rate_limited", "retries", "succeeded", "timeouts", "usage")

    def __init__(self) -> None:
        self.calls = self.succeeded = self.failed = 0
        self.retries = self.rate_limited = self.timeouts = 0
        self.usage = Usage()


class _Attempts:
    """One call's progress through its attempts: count, deadline, who to tell."""

    __slots__ = (
        "count",
        "epoch",
        "estimate",
        "events",
        "forgiven",
        "give_up_at",
        "hedges",
        "hedges_won",
        "meter",
        "model_name",
        "pauses_seen",
        "split",
        "successes_seen",
        "timeouts",
    )

    def __init__(
        self,
        give_up_at: float | None,
        model_name: str,
        meter: BudgetMeter | None,
        events: Emitter | None,
    ) -> None:
        self.count = 0
        self.timeouts = 0  # attempts that timed out
        self.hedges = 0  # duplicate attempts sent, beside the ``count`` retried ones
        self.hedges_won = 0  # ... of which answered before the attempt they doubled
        self.estimate = 0  # tokens charged up front for the current attempt
        self.epoch = 0  # the limiter's rate epoch when the current attempt was sent
        self.pauses_seen = 0  # the endpoint's 429 escalations when it was sent
        self.successes_seen = -1  # the endpoint's successes at this call's last 429
        self.forgiven = 0  # 429s not counted against max_attempts (others got through)
        self.split = (0, 0)  # input and output tokens reserved up front (ITPM, OTPM)
        self.give_up_at = give_up_at  # clock time past which nothing may wait
        self.model_name = model_name
        self.meter = meter
        self.events = events


class Endpoint:
    """A `ChatModel` with its `Limits`, `RetryPolicy` and circuit breaker.

    Parameters:
        model: the chat model (an adapter).
        limits: the endpoint's limits; defaults to ``model.limits`` when the adapter
            carries them, else `Limits()` (concurrency 32, no rate limit).
        retry: the retry policy; defaults to `RetryPolicy()`.
        name: a label for events and errors; defaults to ``model.name`` or its class.
        seed: seeds the backoff jitter (only timing depends on it).
        namespace: the identity of this endpoint in prediction cache keys; defaults
            to ``model.cache_identity`` (adapter and base URL).  Give two endpoints the
            same namespace to share cached answers across base URLs on purpose.
        clock: the clock of deadlines and pauses (tests pass a fake one).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        seed: int | None = None,
        namespace: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if isinstance(model, Endpoint):
            raise TypeError("Endpoint wraps a ChatModel, not another Endpoint")
        if not hasattr(model, "complete"):
            raise TypeError(f"{type(model).__name__} has no async complete() method")
        self.model = model
        model_limits = getattr(model, "limits", None)
        self.limits = limits or (model_limits if isinstance(model_limits, Limits) else Limits())
        self.retry = retry or RetryPolicy()
        self.name = name or str(getattr(model, "name", None) or type(model).__name__)
        identity = getattr(model, "cache_identity", None)
        kind = type(model)
        self.cache_identity: str = namespace or (
            identity
            if isinstance(identity, str) and identity
            else f"{kind.__module__}.{kind.__qualname__}"
        )
        self._clock = clock or loop_time
        self.limiter = RateLimiter(self.limits, clock=self._clock)
        self.breaker = CircuitBreaker(self.retry.circuit_breaker, clock=self._clock)
        after = self.retry.hedge_after
        self.hedger = (
            Hedger(after, self._clock, self.limiter.idle_for) if after is not None else None
        )
        self._rng = random.Random(seed)
        self._completion_tokens_avg: float | None = None
        self._counters = _Counters()
        self._consecutive_429 = 0  # escalations of the 429 backoff since a success
        self._escalations = 0  # escalations of the 429 backoff ever (never reset)
        self._noticed: set[str] = set()  # kinds of provider mistake announced already
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the limiter is of
        self._live = LiveAttempts()  # attempts in flight, whose deadlines may move later

    @classmethod
    def of(cls, model: ChatModel | Endpoint, *, limits: Limits | None = None) -> Endpoint:
        """The endpoint of ``model``: itself when it is one, else the one it shares.

        A bare adapter gets one `Endpoint` the first time and the same one ever after,
        so every evaluation and optimization that uses it shares its limits.
        """
        if isinstance(model, Endpoint):
            if limits is not None and limits != model.limits:
                raise ConfigError(
                    "limits= conflicts with the Endpoint's own limits; set them on the Endpoint"
                )
            return model
        shared = _shared_endpoint(model)
        if shared is None:
            return _share(model, cls(model, limits=limits))
        if limits is not None and limits != shared.limits:
            raise ConfigError(
                f"{shared.name} already runs under {shared.limits!r}, shared by every "
                f"evaluation that uses this model; limits={limits!r} would split its budget. "
                "Give the limits to the adapter (or an Endpoint) once."
            )
        return shared

    # -- identity ---------------------------------------------------------------------
    def format_sent(self, requested: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The response format the model would send right now for ``requested``."""
        resolve = getattr(self.model, "response_format_sent", None)
        if requested is None or resolve is None:
            return requested
        sent: Mapping[str, Any] | None = resolve(requested)
        return sent

    def request_key(self, prompt: Prompt) -> str:
        """The cache identity of asking ``prompt`` here now: prompt hash, this endpoint's
        identity and the response format it would send (see `engine.Cache`)."""
        return request_hash(
            prompt.hash, self.cache_identity, self.format_sent(prompt.response_format)
        )

    # -- the call ---------------------------------------------------------------------
    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        params: Mapping[str, Any],
        *,
        events: Emitter | None = None,
        meter: BudgetMeter | None = None,
    ) -> CallResult:
        """Call the model under the limits, retrying per policy.

        ``meter`` (default: the meter of the run this call is made for) is checked
        before and charged after every attempt.  Raises the last `ProviderError` when
        attempts, the deadline or the error class say to stop, `EndpointUnreachableError`
        when the circuit breaker is open, and `BudgetExceededError` at a budget cap.
        """
        if _running_loop() is not self._loop:
            self._move_to_running_loop()
        deadline = self.retry.deadline
        call = _Attempts(
            self._clock() + deadline if deadline is not None else None,
            str(params.get("model", self.name)),
            meter if meter is not None else current_meter.get(),
            events if events is not None else current_emitter.get(),
        )
        if self.hedger is None:
            return await self._attempts(messages, params, call)
        try:
            result = await self._attempts(messages, params, call)
        except BaseException:
            self._charge_hedges(call, None)
            raise
        self._charge_hedges(call, result.completion.usage)
        return result

    async def _attempts(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], call: _Attempts
    ) -> CallResult:
        """The call's attempts, retried per policy, until one answers or it is given up."""
        while True:
            call.count += 1
            try:
                if self.hedger is None:
                    completion = await self._attempt_under_limits(messages, params, call)
                else:
                    completion = await self._attempt_hedged(messages, params, call)
            except ProviderError as exc:
                exc.timeouts = call.timeouts
                exc.hedges = call.hedges
                if not exc.sent:  # the gate refused to wait: nothing to count or retry
                    exc.attempts = call.count - 1 + call.hedges
                    self._counters.failed += 1
                    raise
                exc.attempts = call.count + call.hedges
                self._on_failure(exc, call)
                await self._before_retry(exc, call)
                continue
            completion = self._on_success(completion, call)
            if call.estimate:
                actual = completion.usage.total_tokens
                await self.limiter.reconcile(estimated=call.estimate, actual=actual)
            if call.split != (0, 0):
                await self._settle_split(call.split, completion.usage)
            return CallResult(completion, call.count + call.hedges, call.timeouts, call.hedges)

    @staticmethod
    def _charge_hedges(call: _Attempts, usage: Usage | None) -> None:
        """Tell the run's meter the duplicates this call sent, each estimated to cost what
        its answer did (``usage``; None when no attempt answered)."""
        if not call.hedges or call.meter is None:
            return
        cost = None
        if usage is not None:
            cost = Usage()
            for _ in range(call.hedges):
                cost = cost + usage
        call.meter.charge_hedges(call.model_name, call.hedges, call.hedges_won, cost)

    def _move_to_running_loop(self) -> None:
        """Bind to the running event loop: at first use, or when the loop this endpoint
        ran on has ended (a second ``asyncio.run``).  Its limiter and breaker are made
        of that loop's primitives; another loop still running owns them."""
        loop, old = _running_loop(), self._loop
        if loop is None:  # not asyncio (trio): one loop per thread is the caller's rule
            return
        if old is not None and old.is_running() and not old.is_closed():
            raise ConfigError(
                f"this {type(self.model).__name__} ({self.name}) is in use by another "
                "event loop (another thread's asyncio.run); create one adapter per loop"
            )
        if old is not None:
            self.limiter.rebind()
            self.breaker.rebind()
        self._loop = loop

    async def _attempt_hedged(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], call: _Attempts
    ) -> Completion:
        """One attempt, with its duplicate when it runs late."""
        assert self.hedger is not None

        def sent(hedges: int, won: int) -> None:
            call.hedges += hedges
            call.hedges_won += won

        return await self.hedger.attempt(
            lambda: self._attempt_under_limits(messages, params, call), sent
        )

    async def _attempt_under_limits(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], call: _Attempts
    ) -> Completion:
        self.breaker.check(self.name)
        call.estimate = self._estimate(messages, params)
        call.split = self._estimate_split(messages, params)
        limiter = self.limiter
        queued = self._clock() if instrumented() else 0.0  # a traced attempt reports its wait
        try:
            await limiter.acquire(
                estimated_tokens=call.estimate,
                admit=lambda w: self._admit(w, call),
                give_up_at=call.give_up_at,
                input_tokens=call.split[0],
                output_tokens=call.split[1],
            )
        except TimeoutError as exc:
            refusal = RateLimitedError(
                f"waited for {exc} past this call's deadline of {self.retry.deadline:g}s",
                endpoint=self.name,
            )
            refusal.sent = False  # refused here, before sending
            raise refusal from exc
        try:
            self.breaker.check(self.name)
            if call.meter is not None:
                call.meter.check()
                call.meter.charge_call(call.model_name)
            self._counters.calls += 1
            call.epoch, call.pauses_seen = limiter.epoch, self._escalations
            attempt = self._attempt(messages, params, self._timeout(call), call)
            return await attempt_span(attempt, self, messages, params, call.count, queued)
        finally:
            limiter.release()

    def _timeout(self, call: _Attempts) -> float | None:
        """This attempt's timeout: the policy's, doubled for each timeout this call had
        against a server seen queueing (it will serve the call, only later), never past
        the call's deadline."""
        timeout = self.retry.timeout
        adaptive = self.limiter.adaptive
        if timeout is not None and call.timeouts and adaptive is not None and adaptive.serves:
            timeout *= 2**call.timeouts
        if call.give_up_at is not None:  # no attempt may outlive the deadline
            left = max(0.001, call.give_up_at - self._clock())
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    async def _attempt(
        self,
        messages: Sequence[Mapping[str, str]],
        params: Mapping[str, Any],
        seconds: float | None,
        call: _Attempts,
    ) -> Completion:
        # A cancel scope with a deadline on the loop's clock: anyio's fail_after, without
        # its context-manager wrapper and backend lookups (this runs once per call).
        started = self._clock()
        deadline = started + seconds if seconds is not None else math.inf
        adaptive = self.limiter.adaptive
        try:
            with anyio.CancelScope(deadline=deadline) as scope:
                if adaptive is None:
                    answer: Any = await self.model.complete(messages, **params)
                else:
                    n = self.limiter.in_flight
                    with self._live.track(scope, n, adaptive, call.give_up_at):
                        answer = await self.model.complete(messages, **params)
                    self._on_round_trip(n, self._clock() - started, call)
            if scope.cancelled_caught:
                raise TimeoutError
        except TimeoutError as exc:
            # ours (the deadline) or the model's own: either way the call did not answer
            within = f" within {seconds:.3g}s" if seconds is not None else ""
            raise CallTimeoutError(f"no answer{within}", endpoint=self.name) from exc
        except ConnectionRefusedError as exc:
            raise ConnectionFailedError(
                f"cannot reach {self.name}: connection refused", endpoint=self.name
            ) from exc
        except ConnectionError as exc:
            # a model that lets a socket error escape instead of translating it
            raise TransientError(
                f"connection failed: {type(exc).__name__}: {exc}", endpoint=self.name
            ) from exc
        if isinstance(answer, str):
            return Completion(answer)
        if not isinstance(answer, Completion) or not isinstance(answer.text, str):
            raise TypeError(
                f"{type(self.model).__name__}.complete() returned {type(answer).__name__}, "
                "not an engine.Completion"
            )
        return answer

    # -- bounded waits ----------------------------------------------------------------
    def _admit(self, wait: float, call: _Attempts) -> None:
        """Refuse a wait at the pause gate that passes the cap or the call's deadline."""
        cap = self.retry.max_retry_after
        if wait > cap:
            refusal = RateLimitedError(
                f"the provider paused this endpoint for {wait:.0f}s, more than "
                f"max_retry_after={cap:g}s; raise RetryPolicy.max_retry_after to wait",
                retry_after=wait,
                endpoint=self.name,
            )
        elif call.give_up_at is not None and self._clock() + wait > call.give_up_at:
            refusal = RateLimitedError(
                f"the provider paused this endpoint for {wait:.1f}s, past this call's "
                f"deadline of {self.retry.deadline:g}s",
                retry_after=wait,
                endpoint=self.name,
            )
        else:
            return
        refusal.sent = False  # refused here, before sending: not the provider's answer
        raise refusal

    async def _before_retry(self, exc: ProviderError, call: _Attempts) -> None:
        """Sleep the backoff before another attempt, or re-raise ``exc`` to stop."""
        policy = self.retry
        if isinstance(exc, RateLimitedError) and (exc.retry_after or 0.0) > policy.max_retry_after:
            self._counters.failed += 1
            raise RateLimitedError(
                f"the provider asked to wait {exc.retry_after:.0f}s (Retry-After), more than "
                f"max_retry_after={policy.max_retry_after:g}s; raise RetryPolicy."
                "max_retry_after to wait",
                retry_after=exc.retry_after,
                endpoint=self.name,
            ) from exc
        if isinstance(exc, RateLimitedError):
            forgivable = call.forgiven < _FORGIVEN_429S_PER_ATTEMPT * policy.max_attempts
            if forgivable and 0 <= call.successes_seen < self._counters.succeeded:
                # other calls got answers since this one's last 429: the provider is up
                # and the 429 is about pace, which the endpoint fixes; no attempt lost
                call.forgiven += 1
            call.successes_seen = self._counters.succeeded
        if exc.fatal or not policy.should_retry(exc, call.count - call.forgiven):
            self._counters.failed += 1
            raise exc
        wait = policy.backoff(call.count, self._rng)
        if call.give_up_at is not None:
            remaining = call.give_up_at - self._clock()
            if remaining <= wait + self.limiter.paused_for():
                self._counters.failed += 1
                raise exc
        self._counters.retries += 1
        if call.events is not None:
            call.events.emit(
                "call.retry",
                level="debug",
                endpoint=self.name,
                attempt=call.count,
                error=type(exc).__name__,
                detail=str(exc),
                wait=round(wait, 3),
            )
        await self.breaker.sleep(wait, self.name)

    # -- bookkeeping ------------------------------------------------------------------
    def _on_failure(self, exc: ProviderError, call: _Attempts) -> None:
        if exc.billed is not None and exc.billed.total_tokens:
            usage = self._charge(exc.billed, call)
            self._notice(
                "billed-failure",
                f"the provider billed {usage.total_tokens} tokens for an answer with no "
                f"usable choice ({exc.detail}); counted in the run's usage and budget",
                call.events,
            )
        if isinstance(exc, RateLimitedError):
            self._counters.rate_limited += 1
            self.limiter.on_rate_limited(call.epoch)
            # Retry-After pauses every worker; without it, back off the whole endpoint
            # exponentially in the number of 429s in a row.  A 429 to a request sent
            # before the last escalation (one burst answered 429 many times over) does
            # not escalate again: the pause already answers it.
            if exc.retry_after is not None:
                self._pause(exc.retry_after, "Retry-After", call)
            elif call.pauses_seen == self._escalations:
                self._escalations += 1
                self._consecutive_429 += 1
                wait = self.retry.backoff(self._consecutive_429, self._rng)
                self._pause(wait, "429 without Retry-After", call)
        elif isinstance(exc, CallTimeoutError):
            self._counters.timeouts += 1
            call.timeouts += 1
            if self.limiter.adaptive is not None:
                self._announce(self.limiter.adaptive.on_timeout(), call)
        try:
            self.breaker.on_failure(exc, self.name)
        except ProviderError as opened:
            opened.attempts = call.count
            self._counters.failed += 1
            raise

    def _on_round_trip(self, n: int, rtt: float, call: _Attempts) -> None:
        """An answer came ``rtt`` seconds after it was sent with ``n`` calls in flight."""
        adaptive = self.limiter.adaptive
        assert adaptive is not None
        change = adaptive.on_answer(n, rtt)
        self._announce(change, call)
        if change is not None and change.serves is not None:
            self._live.extend(adaptive)  # the calls queued behind may take their time

    def _announce(self, change: LevelChange | None, call: _Attempts) -> None:
        """Apply a new adaptive level and say so (``endpoint.concurrency``)."""
        if change is None:
            return
        self.limiter.set_level(change.level)
        if call.events is not None:
            call.events.emit(
                "endpoint.concurrency",
                level="info" if change.level < change.previous else "debug",
                endpoint=self.name,
                concurrency=change.level,
                previous=change.previous,
                ceiling=self.limits.concurrency,
                serves=round(change.serves, 1) if change.serves is not None else None,
                reason=change.reason,
            )

    def _pause(self, seconds: float, reason: str, call: _Attempts) -> None:
        if not self.limiter.pause(seconds) or call.events is None:
            return
        until = datetime.fromtimestamp(time.time() + seconds).strftime("%H:%M:%S")
        call.events.emit(
            "endpoint.paused",
            level="info" if seconds >= _ANNOUNCE_PAUSE else "debug",
            endpoint=self.name,
            seconds=round(seconds, 3),
            until=until,
            reason=reason,
        )

    def _charge(self, usage: Usage, call: _Attempts) -> Usage:
        """Count ``usage`` (negative counts clamped to 0, and announced): what is
        charged to the run's budget and the endpoint's totals."""
        if usage.prompt_tokens < 0 or usage.completion_tokens < 0:
            self._notice(
                "negative-usage",
                f"the provider reported negative token counts ({usage.prompt_tokens} "
                f"prompt, {usage.completion_tokens} completion); counted as 0",
                call.events,
            )
            usage = Usage(max(0, usage.prompt_tokens), max(0, usage.completion_tokens))
        self._counters.usage = self._counters.usage + usage
        if call.meter is not None:
            call.meter.charge_usage(call.model_name, usage)
        return usage

    def _on_success(self, completion: Completion, call: _Attempts) -> Completion:
        self._consecutive_429 = 0
        self.breaker.on_success()
        self.limiter.on_success()
        counters = self._counters
        counters.succeeded += 1
        usage = self._charge(completion.usage, call)
        if usage is not completion.usage:
            completion = dataclasses.replace(completion, usage=usage)
        avg = self._completion_tokens_avg
        done = float(completion.usage.completion_tokens)
        self._completion_tokens_avg = done if avg is None else 0.9 * avg + 0.1 * done
        if completion.rate_limits is not None:
            for kind, text in self.limiter.observe(completion.rate_limits):
                self._notice(kind, text, call.events)
        return completion

    def _notice(self, kind: str, text: str, events: Emitter | None) -> None:
        """Announce something wrong with what the provider said, once per kind."""
        if kind in self._noticed:
            return
        self._noticed.add(kind)
        if events is not None:
            events.emit(
                "endpoint.notice", level="warning", endpoint=self.name, kind=kind, detail=text
            )

    def _estimate(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> int:
        if not self.limiter.counts_tokens:  # only a token bucket needs it
            return 0
        cap = params.get("max_tokens") or params.get("max_completion_tokens")
        guess = self._completion_tokens_avg or _DEFAULT_COMPLETION_TOKENS
        expected = int(min(guess, cap) if isinstance(cap, int) else guess)
        return estimate_request_tokens(messages, expected)

    def _estimate_split(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> tuple[int, int]:
        """Input tokens (estimated) and output tokens (``max_tokens``, else the adapter's
        default, else the running guess) to reserve where they are limited apart."""
        if not self.limiter.counts_split_tokens:
            return 0, 0
        cap = params.get("max_tokens") or params.get("max_completion_tokens")
        if not isinstance(cap, int):
            cap = getattr(self.model, "default_max_tokens", None)
        guess = self._completion_tokens_avg or _DEFAULT_COMPLETION_TOKENS
        output = cap if isinstance(cap, int) and cap > 0 else int(guess)
        return estimate_request_tokens(messages, 0), output

    async def _settle_split(self, split: tuple[int, int], usage: Usage) -> None:
        # cache reads do not count against Anthropic's ITPM; cache writes do
        await self.limiter.reconcile_split(
            input_estimate=split[0],
            input_actual=usage.prompt_tokens + usage.cache_creation_input_tokens,
            output_estimate=split[1],
            output_actual=usage.completion_tokens,
        )

    def statistics(self) -> EndpointStatistics:
        c = self._counters
        return EndpointStatistics(
            name=self.name,
            calls=c.calls,
            succeeded=c.succeeded,
            failed=c.failed,
            retries=c.retries,
            rate_limited=c.rate_limited,
            timeouts=c.timeouts,
            usage=c.usage,
            limiter=self.limiter.statistics(),
            breaker_open=self.breaker.is_open,
            connection_failures=self.breaker.consecutive_failures,
            hedges=self.hedger.sent if self.hedger is not None else 0,
            hedges_won=self.hedger.won if self.hedger is not None else 0,
        )

    def __repr__(self) -> str:
        return f"<Endpoint {self.name!r} {self.limits!r}>"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop, or ``None`` under another event loop (trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# Models that refuse attributes (``__slots__``) keep their endpoint here instead; weak,
# so the endpoint lives exactly as long as the model object the user holds.
_SLOTTED: weakref.WeakKeyDictionary[Any, Endpoint] = weakref.WeakKeyDictionary()


def _shared_endpoint(model: ChatModel) -> Endpoint | None:
    shared = getattr(model, _SHARED_ATTRIBUTE, None)
    if isinstance(shared, Endpoint):
        return shared
    try:
        return _SLOTTED.get(model)
    except TypeError:  # neither attributes nor weak references: nothing to share with
        return None


def _share(model: ChatModel, endpoint: Endpoint) -> Endpoint:
    try:
        object.__setattr__(model, _SHARED_ATTRIBUTE, endpoint)
    except (AttributeError, TypeError):
        # not weakly referenceable either: this call gets its own endpoint
        with contextlib.suppress(TypeError):
            _SLOTTED[model] = endpoint
    return endpoint
