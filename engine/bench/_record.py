"""What the endpoint benchmark records, and the hard caps it enforces.

`RecordingModel` sits between `Endpoint` and the adapter, so it sees every attempt
the engine really sends (retries included), as the adapter returned it: start and end
time, the error class, the HTTP status, Retry-After, the usage and the rate-limit
headers.  It also holds the sweep's hard caps: each attempt must be admitted by
`RequestCaps` before it is sent, so a cap is checked where the request leaves.

Cost caps reserve a worst case per attempt in flight and settle it with the usage the
provider reports, so the total never passes the cap as long as the provider honours
``max_tokens`` (prompt tokens are bounded by bytes, see `worst_case_usage`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._budget import Price
from .._errors import BudgetExceededError, ConfigError, ProviderError, RateLimitedError
from .._protocols import ChatModel
from .._redact import redact_text
from .._types import Completion, RateLimitSnapshot, Usage

__all__ = ["Attempt", "RecordingModel", "RequestCaps", "completion_cap", "worst_case_usage"]

# Chat formatting a provider adds around each message, and once per request, in
# tokens (role markers, separators, the assistant primer): generous on purpose.
_TOKENS_PER_MESSAGE = 8
_TOKENS_PER_REQUEST = 8


def completion_cap(params: Mapping[str, Any]) -> int | None:
    """The completion-token cap a request carries (``max_tokens`` or its newer name)."""
    cap = params.get("max_tokens") or params.get("max_completion_tokens")
    return cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else None


def worst_case_usage(messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> Usage:
    """The most a request can use: every byte a token, plus formatting, plus the cap.

    Byte-level tokenizers (BPE, SentencePiece with byte fallback) never make more
    tokens than bytes, so this bounds the prompt without knowing the tokenizer.
    Raises `ConfigError` when the request has no completion cap: nothing bounds it.
    """
    cap = completion_cap(params)
    if cap is None:
        raise ConfigError(
            "a cost cap needs a bound on completion tokens: set max_tokens in "
            "[prompt].params or pass --max-tokens"
        )
    size = sum(len(str(m.get("content", "")).encode()) for m in messages)
    return Usage(size + _TOKENS_PER_MESSAGE * len(messages) + _TOKENS_PER_REQUEST, cap)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One request as the adapter handled it.

    ``error`` is the engine's error class name (``RateLimitedError``,
    ``CallTimeoutError``, ...), ``None`` for an answer; ``detail`` its message
    (redacted, cut to 200 characters).
    """

    level: int
    start: float
    end: float
    error: str | None = None
    status: int | None = None
    retry_after: float | None = None
    usage: Usage | None = None
    rate_limits: RateLimitSnapshot | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.start


class RequestCaps:
    """Hard caps over a whole sweep: attempts sent, and dollars spent.

    `admit` is called right before each attempt and raises `BudgetExceededError` once
    the next attempt could pass a cap; the refusal is final (``stopped``).  In-flight
    attempts hold their worst-case cost until `settle` replaces it with the real one.
    """

    def __init__(
        self,
        *,
        max_requests: int | None = None,
        max_cost: float | None = None,
        price: Price | None = None,
    ) -> None:
        if max_cost is not None and price is None:
            raise ConfigError("a cost cap needs the model's price ([budget] prices)")
        self.max_requests = max_requests
        self.max_cost = max_cost
        self.price = price
        self.attempts = 0  # admitted so far
        self.spent = 0.0  # dollars of settled attempts
        self.reserved = 0.0  # worst-case dollars of attempts in flight
        self.stopped: str | None = None  # why the caps refused, once they did

    def admit(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> float:
        """Count one attempt, or raise; returns the dollars reserved for it."""
        if self.stopped is None:
            self.stopped = self._refusal(messages, params)
        if self.stopped is not None:
            raise BudgetExceededError(self.stopped)
        worst = self._worst(messages, params)
        self.attempts += 1
        self.reserved += worst
        return worst

    def _refusal(
        self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
    ) -> str | None:
        if self.max_requests is not None and self.attempts >= self.max_requests:
            return f"request cap reached: {self.attempts} of --max-requests {self.max_requests}"
        if self.max_cost is not None:
            committed = self.spent + self.reserved
            if committed + self._worst(messages, params) > self.max_cost:
                return (
                    f"cost cap reached: ${committed:.4f} spent or in flight; one more request "
                    f"could pass --max-cost ${self.max_cost:g}"
                )
        return None

    def _worst(self, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]) -> float:
        if self.max_cost is None or self.price is None:
            return 0.0
        return self.price.cost(worst_case_usage(messages, params))

    def settle(self, reserved: float, attempt: Attempt) -> None:
        """Replace an attempt's reservation with what it cost.

        An answer costs its usage (its worst case when the provider reported none);
        an HTTP error status costs nothing; a failure with no status (timeout, dropped
        connection, unreadable body) may have been billed: it keeps its worst case.
        """
        self.reserved = max(0.0, self.reserved - reserved)
        if attempt.ok and attempt.usage is not None and attempt.usage.total_tokens > 0:
            self.spent += self.price.cost(attempt.usage) if self.price is not None else 0.0
        elif attempt.ok or attempt.status is None or 200 <= attempt.status < 300:
            self.spent += reserved


def _classify(exc: BaseException) -> str:
    """The engine error class an `Endpoint` makes of what the adapter raised."""
    if isinstance(exc, ProviderError):
        return type(exc).__name__
    if isinstance(exc, (anyio.get_cancelled_exc_class(), TimeoutError)):
        # inside a sweep only the endpoint's call timeout cancels an attempt
        return "CallTimeoutError"
    if isinstance(exc, ConnectionError):
        return "TransientError"
    return type(exc).__name__


class RecordingModel:
    """A `ChatModel` that records every attempt of ``model`` and applies ``caps``.

    Wrap the adapter, then put the `Endpoint` around this, so what is recorded is
    what the engine's limiter and retry policy actually sent.  ``level`` tags the
    attempts of the current sweep level; ``recording = False`` stops recording (an
    aborted sweep's cancelled attempts are not measurements).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        caps: RequestCaps | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.caps = caps or RequestCaps()
        self.name = str(getattr(model, "name", None) or type(model).__name__)
        self.attempts: list[Attempt] = []
        self.level = 0
        self.recording = True
        self._clock = clock

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Any:
        reserved = self.caps.admit(messages, params)
        start = self._clock()
        try:
            answer = await self.model.complete(messages, **params)
        except BaseException as exc:
            retry_after = exc.retry_after if isinstance(exc, RateLimitedError) else None
            status = exc.status if isinstance(exc, ProviderError) else None
            detail = redact_text(str(exc) or type(exc).__name__)[:200]
            self._record(
                reserved,
                Attempt(
                    self.level,
                    start,
                    self._clock(),
                    _classify(exc),
                    status,
                    retry_after,
                    detail=detail,
                ),
            )
            raise
        # the endpoint accepts a bare string too; it carries no usage or headers
        usage = answer.usage if isinstance(answer, Completion) else None
        limits = answer.rate_limits if isinstance(answer, Completion) else None
        self._record(
            reserved, Attempt(self.level, start, self._clock(), usage=usage, rate_limits=limits)
        )
        return answer

    def _record(self, reserved: float, attempt: Attempt) -> None:
        self.caps.settle(reserved, attempt)
        if self.recording:
            self.attempts.append(attempt)
