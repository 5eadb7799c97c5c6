"""The simulated provider's other dialects (Anthropic, Gemini) over one handler.

`NativeProvider` does for a dialect what the OpenAI handler of
``adapters.simulated_server`` does for chat completions, with the same `ServerConfig`
and the same `ServerStats`: credentials, the spend limit and the daily quota, RPM and
token buckets (input and output apart: ``input_tpm``/``output_tpm``, or ``tpm`` for
input), a throttle window, latency and the fault table.  What differs by dialect (the
request's shape, the answer's, the error bodies, the retry signal, the rate-limit
headers) comes from a dialect object (``_simulated_anthropic``, ``_simulated_gemini``).

The fault table, one uniform draw per served request, in this order: ``hang_rate``,
``error_rate`` (500), ``overloaded_rate`` (Anthropic 529, Gemini 503), ``drop_rate``,
``malformed_rate``, then ``null_content_rate`` of the answers come without text
(Anthropic ``stop_reason: refusal``, Gemini ``finishReason: SAFETY``).  Refused before
that: ``spend_limit`` (Anthropic's ``enforced_spend_limit_reached``; Gemini's quota),
``daily_quota`` (Gemini's per-day ``QuotaFailure``; Anthropic's 402), and from the
``throttle_after``-th paid request on, ``throttle_seconds`` of 429s whose retry signal
is the time left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ._simulated_anthropic import AnthropicDialect
from ._simulated_base import (
    Bucket,
    ServerConfig,
    ServerStats,
    SimulatedHandler,
    send_json,
)
from ._simulated_gemini import GeminiDialect

__all__ = ["DIALECTS", "NativeDialect", "NativeProvider", "native_routes"]


class NativeDialect(Protocol):
    """What a dialect module supplies to `NativeProvider`."""

    name: str
    paths: tuple[str, ...]
    malformed: bytes

    def authorized(self, headers: Mapping[str, str], key: str | None) -> bool: ...

    def parse(self, raw: bytes, path_params: Mapping[str, str]) -> dict[str, Any] | None: ...

    def answer(
        self, body: Mapping[str, Any], text: str, digest: str, null_content: bool
    ) -> tuple[dict[str, Any], int, int]: ...

    def error(self, fault: str, message: str, wait: float) -> tuple[int, Any, dict[str, str]]: ...

    def limit_headers(self, state: Mapping[str, tuple[float, float, float]]) -> dict[str, str]: ...


DIALECTS: Mapping[str, Callable[[], NativeDialect]] = {
    "anthropic": AnthropicDialect,
    "gemini": GeminiDialect,
}


class NativeProvider(SimulatedHandler):
    """The handler of one dialect's route (a raw ASGI app, as the OpenAI one is)."""

    secret_headers = frozenset({"x-api-key", "x-goog-api-key", "authorization"})

    def __init__(self, dialect: NativeDialect, config: ServerConfig, stats: ServerStats) -> None:
        super().__init__(config, stats)
        self.dialect = dialect
        input_tpm = config.input_tpm or config.tpm
        output_tpm = config.output_tpm
        self.buckets = {
            name: Bucket(rate)
            for name, rate in (
                ("requests", config.rpm),
                ("input", input_tpm),
                ("output", output_tpm),
            )
            if rate
        }
        self.paid = 0
        self.throttled_until = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = await self._receive(scope, receive)
        if received is None:
            return
        raw, headers, digest, now = received
        refusal = self._refusal(headers)
        body = None if refusal else self.dialect.parse(raw, scope.get("path_params") or {})
        if refusal is None and body is None:
            refusal = "invalid"
        if refusal is not None or body is None:
            await self._fail(send, refusal or "invalid", "refused")
            return
        text = self.config.answer(body["messages"], body)
        answer, prompt, output = self.dialect.answer(body, text, digest, False)
        wait = self._take(now, prompt, output)
        if wait:
            self.stats.rate_limited += 1
            await self._fail(send, "rate_limited", "Rate limit reached", wait)
            return
        await self._serve(send, receive, body, (text, answer), digest, now)

    def _refusal(self, headers: Mapping[str, str]) -> str | None:
        """The fault a request is refused with before it is read, if any."""
        stats, c = self.stats, self.config
        if not self.dialect.authorized(headers, c.api_key):
            stats.unauthorized += 1
            return "unauthorized"
        for fault in ("spend_limit", "daily_quota"):
            if getattr(c, fault):
                stats.quota_refusals += 1
                return fault
        return None

    def _take(self, now: float, prompt: int, output: int) -> float:
        """Take a request and its tokens from every bucket, or the wait if refused
        (nothing is taken then).  A throttle window refuses with the time it has left."""
        with self.lock:
            if now < self.throttled_until:
                return self.throttled_until - now
            amounts = {"requests": 1.0, "input": float(prompt), "output": float(output)}
            waits = [b.wait_for(amounts[name]) for name, b in self.buckets.items()]
            wait = max(waits, default=0.0)
            if wait:
                return wait
            for name, bucket in self.buckets.items():
                bucket.level -= min(amounts[name], bucket.capacity)
            return 0.0

    def _limit_headers(self) -> dict[str, str]:
        if not self.config.headers:
            return {}
        with self.lock:
            return self.dialect.limit_headers({n: b.state() for n, b in self.buckets.items()})

    async def _fail(self, send: Send, fault: str, message: str, wait: float = 0.0) -> None:
        status, body, headers = self.dialect.error(fault, message, wait)
        await send_json(send, status, body, {**self._limit_headers(), **headers})

    async def _serve(
        self,
        send: Send,
        receive: Receive,
        body: Mapping[str, Any],
        answered: tuple[str, dict[str, Any]],
        digest: str,
        now: float,
    ) -> None:
        """Wait the latency (or hang), then answer: a fault, or the paid answer."""
        stats, c = self.stats, self.config
        roll = self.rng.random()
        with self._in_flight():
            if await self._wait_latency(roll, receive):
                return
            if await self._fault(send, roll - c.hang_rate):
                return
            roll -= c.hang_rate + c.error_rate + c.overloaded_rate + c.drop_rate
            null = 0 <= roll - c.malformed_rate < c.null_content_rate
            text, answer = answered
            if null:
                stats.null_contents += 1
                answer = self.dialect.answer(body, text, digest, True)[0]
            self._paid(now)
            await send_json(send, 200, answer, self._limit_headers())

    def _paid(self, now: float) -> None:
        with self.lock:
            self.stats.paid += 1
            self.stats.paid_arrivals.append(now)
            self.paid += 1
            after = self.config.throttle_after
            if after is not None and self.paid == after:
                self.throttled_until = time.monotonic() + self.config.throttle_seconds

    async def _fault(self, send: Send, roll: float) -> bool:
        """Serve the injected fault ``roll`` lands on, if any (True when one was)."""
        stats, c = self.stats, self.config
        for fault, rate in (("server_error", c.error_rate), ("overloaded", c.overloaded_rate)):
            if 0 <= roll < rate:
                if fault == "overloaded":
                    stats.overloaded += 1
                else:
                    stats.server_errors += 1
                await self._fail(send, fault, f"{fault} (injected)")
                return True
            roll -= rate
        return await self._drop_or_malform(
            send, roll, self.dialect.malformed, self._limit_headers()
        )


def native_routes(
    config: ServerConfig, stats: ServerStats, dialects: tuple[str, ...]
) -> list[Route]:
    """The routes of the native ``dialects`` named (others are ignored), each dialect
    with its own handler (and buckets) and the server's one `ServerStats`."""
    routes = []
    for name in dialects:
        kind = DIALECTS.get(name)
        if kind is None:
            continue
        dialect = kind()
        handler = NativeProvider(dialect, config, stats)
        routes += [Route(path, endpoint=handler, methods=["POST"]) for path in dialect.paths]
    return routes
