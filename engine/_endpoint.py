"""`Endpoint`: a chat model behind its limiter and retry policy.

Every call of the engine goes through ``Endpoint.complete``: wait at the pause gate,
take a concurrency slot, a request and the estimated tokens, call with a timeout,
feed the response's rate-limit headers back, and retry retryable failures with
full-jitter backoff.  One `Endpoint` per provider endpoint, shared by every evaluation
that uses it, is what makes the limits hold across concurrent work.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from ._budget import BudgetMeter
from ._errors import CallTimeoutError, ProviderError, RateLimitedError, TransientError
from ._events import Emitter
from ._limits import LimiterStatistics, Limits, RateLimiter
from ._protocols import ChatModel
from ._retry import RetryPolicy
from ._types import Completion, Usage

__all__ = ["CallResult", "Endpoint", "EndpointStatistics", "estimate_tokens"]

# Completion-length guess before the endpoint has answered anything.
_DEFAULT_COMPLETION_TOKENS = 256


def estimate_tokens(messages: Sequence[Mapping[str, str]], completion_tokens: int) -> int:
    """Prompt tokens by the usual 4-characters rule, plus the expected completion."""
    chars = sum(len(m.get("content", "")) for m in messages)
    return chars // 4 + 4 * len(messages) + completion_tokens


@dataclass(frozen=True, slots=True)
class CallResult:
    """A completion and what it took: attempts made and tokens paid across them."""

    completion: Completion
    attempts: int


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


class Endpoint:
    """A `ChatModel` with its `Limits` and `RetryPolicy`.

    Parameters:
        model: the chat model (an adapter).
        limits: the endpoint's limits; defaults to ``model.limits`` when the adapter
            carries them, else `Limits()` (concurrency 32, no rate limit).
        retry: the retry policy; defaults to `RetryPolicy()`.
        name: a label for events and errors; defaults to ``model.name`` or its class.
        seed: seeds the backoff jitter (only timing depends on it).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        seed: int | None = None,
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
        self.limiter = RateLimiter(self.limits)
        self._rng = random.Random(seed)
        self._completion_tokens_avg: float | None = None
        self._calls = self._succeeded = self._failed = 0
        self._retries = self._rate_limited = self._timeouts = 0
        self._usage = Usage()
        self._consecutive_429 = 0

    @classmethod
    def of(cls, model: ChatModel | Endpoint, *, limits: Limits | None = None) -> Endpoint:
        """``model`` itself when it is an `Endpoint` already, else a new one around it."""
        if isinstance(model, Endpoint):
            if limits is not None and limits != model.limits:
                raise ValueError(
                    "limits= conflicts with the Endpoint's own limits; set them on the Endpoint"
                )
            return model
        return cls(model, limits=limits)

    def _expected_completion_tokens(self, params: Mapping[str, Any]) -> int:
        cap = params.get("max_tokens") or params.get("max_completion_tokens")
        guess = (
            self._completion_tokens_avg
            if self._completion_tokens_avg is not None
            else _DEFAULT_COMPLETION_TOKENS
        )
        return int(min(guess, cap) if isinstance(cap, int) else guess)

    def _learn(self, usage: Usage) -> None:
        avg = self._completion_tokens_avg
        done = float(usage.completion_tokens)
        self._completion_tokens_avg = done if avg is None else 0.9 * avg + 0.1 * done

    async def complete(
        self,
        messages: Sequence[Mapping[str, str]],
        params: Mapping[str, Any],
        *,
        events: Emitter | None = None,
        meter: BudgetMeter | None = None,
    ) -> CallResult:
        """Call the model under the limits, retrying per policy.

        ``meter`` is checked before and charged after every attempt.  Raises the last
        `ProviderError` when attempts, the deadline or the error class say to stop, and
        `BudgetExceededError` when the meter's cap is reached.
        """
        model_name = str(params.get("model", self.name))
        policy = self.retry
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            estimate = (  # only a token bucket needs it
                estimate_tokens(messages, self._expected_completion_tokens(params))
                if self.limiter.counts_tokens
                else 0
            )
            try:
                async with self.limiter.slot(estimated_tokens=estimate):
                    if meter is not None:
                        meter.check()
                        meter.charge_call(model_name)
                    self._calls += 1
                    timeout = policy.timeout
                    if policy.deadline is not None:  # no attempt may outlive the deadline
                        left = max(0.001, policy.deadline - (time.monotonic() - started))
                        timeout = left if timeout is None else min(timeout, left)
                    completion = await self._attempt(messages, params, timeout)
            except ProviderError as exc:
                self._on_failure(exc)
                exc.attempts = attempt
                if exc.fatal or not policy.should_retry(exc, attempt):
                    self._failed += 1
                    raise
                wait = policy.backoff(attempt, self._rng)
                if policy.deadline is not None:
                    remaining = policy.deadline - (time.monotonic() - started)
                    if remaining <= wait + self.limiter.paused_for():
                        self._failed += 1
                        raise
                self._retries += 1
                if events is not None:
                    events.emit(
                        "call.retry",
                        level="debug",
                        endpoint=self.name,
                        attempt=attempt,
                        error=type(exc).__name__,
                        detail=str(exc),
                        wait=round(wait, 3),
                    )
                await anyio.sleep(wait)
                continue
            self._consecutive_429 = 0
            self.limiter.on_success()
            self._succeeded += 1
            self._usage = self._usage + completion.usage
            if meter is not None:
                meter.charge_usage(model_name, completion.usage)
            self._learn(completion.usage)
            self.limiter.observe(completion.rate_limits)
            await self.limiter.reconcile(estimated=estimate, actual=completion.usage.total_tokens)
            return CallResult(completion, attempt)

    async def _attempt(
        self,
        messages: Sequence[Mapping[str, str]],
        params: Mapping[str, Any],
        seconds: float | None,
    ) -> Completion:
        try:
            with anyio.fail_after(seconds):
                answer: Any = await self.model.complete(messages, **params)
        except TimeoutError as exc:
            # ours (fail_after) or the model's own: either way the call did not answer
            raise CallTimeoutError(f"no answer within {seconds:.3g}s", endpoint=self.name) from exc
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

    def _on_failure(self, exc: ProviderError) -> None:
        if isinstance(exc, RateLimitedError):
            self._rate_limited += 1
            self._consecutive_429 += 1
            self.limiter.on_rate_limited()
            # Retry-After pauses every worker; without it, back off the whole endpoint
            # exponentially in the number of 429s in a row.
            if exc.retry_after is not None:
                self.limiter.pause(exc.retry_after)
            else:
                self.limiter.pause(self.retry.backoff(self._consecutive_429, self._rng))
        elif isinstance(exc, CallTimeoutError):
            self._timeouts += 1

    def statistics(self) -> EndpointStatistics:
        return EndpointStatistics(
            name=self.name,
            calls=self._calls,
            succeeded=self._succeeded,
            failed=self._failed,
            retries=self._retries,
            rate_limited=self._rate_limited,
            timeouts=self._timeouts,
            usage=self._usage,
            limiter=self.limiter.statistics(),
        )

    def __repr__(self) -> str:
        return f"<Endpoint {self.name!r} {self.limits!r}>"
