"""`ScriptedModel`: a deterministic, in-process chat model for tests and examples.

It wraps a handler function the way httpx's ``MockTransport`` does: the handler gets
the request and returns the answer text (or a `Completion`), sync or async.  Latency
and faults are injected around it, and every request is logged with its arrival time
so tests count what the *provider* saw.  It needs no SDK and no network.
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._clock import loop_time
from ._errors import RateLimitedError, TransientError
from ._types import Completion, Usage
from .endpoint import Limits, estimate_text_tokens

__all__ = ["FaultPlan", "ScriptedModel", "ScriptedRequest", "transient_faults"]


@dataclass(frozen=True, slots=True)
class ScriptedRequest:
    """One request as the scripted provider received it."""

    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any]
    time: float
    attempt: int  # how many times this exact request had been seen before, plus one

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


Handler = Callable[[ScriptedRequest], "str | Completion | Awaitable[str | Completion]"]
FaultPlan = Callable[[ScriptedRequest], "BaseException | None"]
"""Decides, per request, whether to fail it (return the exception to raise) or not."""


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def transient_faults(rate: float, *, seed: int = 0, retry_after: float | None = None) -> FaultPlan:
    """Fail each attempt with probability ``rate``, deterministically per (request, attempt).

    Raises `TransientError` (or `RateLimitedError` when ``retry_after`` is given).
    """

    def plan(request: ScriptedRequest) -> BaseException | None:
        if _unit(seed, request.text, request.params.get("model"), request.attempt) >= rate:
            return None
        if retry_after is not None:
            return RateLimitedError(retry_after=retry_after, endpoint="scripted")
        return TransientError("injected transient failure", endpoint="scripted", status=503)

    return plan


@dataclass
class _Stats:
    requests: list[ScriptedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    faults: int = 0
    completed: int = 0
    cancelled: int = 0


class ScriptedModel:
    """A chat model around ``handler``; implements `engine.ChatModel`.

    Parameters:
        handler: ``(ScriptedRequest) -> str | Completion`` (sync or async).
        latency: seconds per call, or ``(rng) -> seconds`` for a distribution.
        faults: a `FaultPlan` deciding which attempts fail.
        limits: carried for `engine.Endpoint` to pick up.
        keep_requests: log every request (turn off for million-call benchmarks).
        seed: seeds the latency distribution.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        latency: float | Callable[[random.Random], float] = 0.0,
        faults: FaultPlan | None = None,
        limits: Limits | None = None,
        name: str = "scripted",
        keep_requests: bool = True,
        seed: int = 0,
    ) -> None:
        self.handler = handler
        self.latency = latency
        self.faults = faults
        self.limits = limits
        self.name = name
        self.keep_requests = keep_requests
        self._rng = random.Random(seed)
        self._seen: dict[str, int] = {}
        self.stats = _Stats()

    @property
    def cache_identity(self) -> str:
        """Who answers, for cache keys: scripted models with other names are other
        endpoints (their answers are never each other's cache hits)."""
        return f"scripted:{self.name}"

    @property
    def requests(self) -> list[ScriptedRequest]:
        return self.stats.requests

    @property
    def calls(self) -> int:
        """Requests received (every attempt counts: this is what a provider bills)."""
        return (
            len(self.stats.requests)
            if self.keep_requests
            else self.stats.completed + self.stats.faults
        )

    def request_times(self) -> list[float]:
        return [r.time for r in self.stats.requests]

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        msgs = tuple(dict(m) for m in messages)
        attempt = 1
        if self.keep_requests or self.faults is not None:  # faults may depend on it
            text_key = repr((msgs, sorted(params.items(), key=lambda kv: kv[0])))
            attempt = self._seen.get(text_key, 0) + 1
            self._seen[text_key] = attempt
        request = ScriptedRequest(msgs, dict(params), loop_time(), attempt)
        stats = self.stats
        if self.keep_requests:
            stats.requests.append(request)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            delay = self.latency(self._rng) if callable(self.latency) else self.latency
            if delay > 0:
                await anyio.sleep(delay)
            fault = self.faults(request) if self.faults is not None else None
            if fault is not None:
                stats.faults += 1
                raise fault
            answer = self.handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
            stats.completed += 1
        except anyio.get_cancelled_exc_class():
            stats.cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
        if isinstance(answer, Completion):
            return answer
        prompt_tokens = estimate_text_tokens("".join(m["content"] for m in msgs))
        return Completion(
            text=answer,
            usage=Usage(prompt_tokens, estimate_text_tokens(answer)),
            model=str(params.get("model", self.name)),
            finish_reason="stop",
        )

    def __repr__(self) -> str:
        return f"<ScriptedModel {self.name!r} calls={self.calls}>"
