"""What every dialect of the simulated provider shares: its configuration, its
statistics, and the few ASGI helpers that write answers and faults by hand."""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl

import anyio
from starlette.types import Receive, Scope, Send

__all__ = [
    "Answer",
    "Bucket",
    "ServerConfig",
    "ServerStats",
    "SimulatedHandler",
    "drop_connection",
    "echo_answer",
    "parse_chat_request",
    "read_body",
    "send_json",
    "send_raw",
    "sleep_or_disconnect",
]

Answer = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], str]


def echo_answer(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """The default behaviour: answer with the last message's content."""
    return str(messages[-1].get("content", "")) if messages else ""


@dataclass(kw_only=True)
class ServerConfig:
    """What the simulated provider enforces and injects.

    Rates are probabilities per request; ``retry_after`` is ``"seconds"``, ``"ms"`` or
    ``"none"`` (how 429s tell the client when to come back).  ``api_key`` makes the
    server check ``Authorization: Bearer KEY``, and with ``api_key_header`` also
    Azure's ``api-key: KEY``.  ``quota_exhausted`` answers every chat request with
    OpenAI's 429 ``insufficient_quota``.  ``null_content_rate`` of the answers come
    without text, of ``null_content_kind`` (``refusal``, ``tool_calls`` or
    ``content_filter``), in chat and in batches alike.  ``slots`` makes the server
    serve that many chat requests at a time and queue the rest, as a local model
    server does (llama.cpp's ``--parallel``): a request whose client gave up while it
    was queued or served is still served to the end, and paid.

    ``announce_limit_requests`` (and ``announce_limit_tokens``) are sent verbatim as
    ``x-ratelimit-limit-*`` on every answer, whatever the real limit: a provider or
    gateway that announces a wrong, absurd or unparsable limit (``"1000000000"``,
    ``"-5"``, ``"inf"``).  ``usage`` overrides the billed counts in every answer
    (``{"prompt_tokens": -300}``); ``body`` answers every request with these raw bytes
    (status 200): a body of a shape or encoding the client must cope with; with
    ``chunked`` it goes in 64 KiB pieces without a Content-Length.
    """

    rpm: float | None = None
    tpm: float | None = None
    latency_median: float = 0.0
    latency_sigma: float = 0.0
    latency_cap: float = 30.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    hang_seconds: float = 30.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    retry_after: str = "seconds"
    api_key: str | None = None
    api_key_header: bool = False
    quota_exhausted: bool = False
    null_content_rate: float = 0.0
    null_content_kind: str = "refusal"
    reject_json_schema: bool = False
    headers: bool = True
    announce_limit_requests: str | None = None
    announce_limit_tokens: str | None = None
    usage: Mapping[str, Any] | None = None
    body: bytes | None = None
    chunked: bool = False
    answer: Answer = echo_answer
    seed: int = 0
    batch_delay: float = 0.5
    batch_failure_rate: float = 0.0
    batch_expire: bool = False
    # the native dialects (adapters._simulated_native): see its docstring
    dialects: tuple[str, ...] = ("openai", "anthropic", "gemini")
    input_tpm: float | None = None
    output_tpm: float | None = None
    overloaded_rate: float = 0.0
    spend_limit: bool = False
    daily_quota: bool = False
    throttle_after: int | None = None
    throttle_seconds: float = 3.0
    slots: int | None = None


@dataclass
class ServerStats:
    """What the server saw.  ``paid`` counts answered requests (what a provider bills).

    ``routes`` counts requests per path; ``last_request`` is the last one's path, query
    and headers (credential headers only by name); ``client_ports`` are the client
    ends of the connections used (keep-alive reuses them).
    """

    received: int = 0
    paid: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    hangs: int = 0
    drops: int = 0
    malformed: int = 0
    unauthorized: int = 0
    rejected_format: int = 0
    outage_refusals: int = 0
    quota_refusals: int = 0
    not_found: int = 0
    null_contents: int = 0
    disconnects: int = 0
    repeats: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    paid_arrivals: list[float] = field(default_factory=list)
    routes: dict[str, int] = field(default_factory=dict)
    last_request: dict[str, Any] | None = None
    client_ports: set[int] = field(default_factory=set)
    overloaded: int = 0  # Anthropic 529s and Gemini 503s injected (native dialects)

    @property
    def connections(self) -> int:
        """Distinct client connections seen (by source port)."""
        return len(self.client_ports)

    def max_in_window(self, window: float = 1.0, *, paid_only: bool = False) -> int:
        """Most requests that arrived within any ``window`` seconds."""
        times = sorted(self.paid_arrivals if paid_only else self.arrivals)
        best = lo = 0
        for hi, t in enumerate(times):
            while t - times[lo] >= window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def summary(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("arrivals", "paid_arrivals", "client_ports", "last_request"):
            data.pop(name)
        data["connections"] = self.connections
        data["max_per_second"] = self.max_in_window(1.0)
        return data


def parse_chat_request(raw: bytes) -> dict[str, Any] | None:
    """The request body if it is a JSON object with a ``messages`` list, else ``None``."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    return body


# -- ASGI helpers ------------------------------------------------------------------
async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def drop_connection(send: Send) -> NoReturn:
    """Start a 200 promising 4 KB, send a few bytes, and abort the connection."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"id": "chat', "more_body": True})
    raise ConnectionAbortedError("injected dropped connection")


async def sleep_or_disconnect(delay: float, receive: Receive) -> bool:
    """Sleep ``delay`` seconds; True if the client went away first."""
    if delay <= 0:
        return False
    disconnected = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await anyio.sleep(delay)
        tg.cancel_scope.cancel()
    return disconnected


async def send_raw(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    pairs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, data: Any, headers: Mapping[str, str] | None = None
) -> None:
    await send_raw(send, status, json.dumps(data).encode(), headers)


# -- what every dialect's handler does ---------------------------------------------
class Bucket:
    """A token bucket refilled continuously: one second's worth of ``per_minute``."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)  # one second's worth
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """0 if ``amount`` is there now, else the seconds until it is."""
        self._refill()
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def take(self, amount: float) -> float:
        """Take ``amount`` if available and return 0, else the seconds until it is."""
        wait = self.wait_for(amount)
        if not wait:
            self.level -= min(amount, self.capacity)
        return wait

    def reset_in(self) -> float:
        """Seconds until the bucket is full again."""
        self._refill()
        return (self.capacity - self.level) / self.rate

    def state(self) -> tuple[float, float, float]:
        """The limit per minute, the level now, and the seconds until full."""
        reset = self.reset_in()
        return self.per_minute, self.level, reset


class SimulatedHandler:
    """The parts of a dialect's request handler that do not depend on the dialect:
    counting arrivals, the latency draw, concurrency, hangs and client disconnects,
    and the dropped or malformed answers of the fault table.

    A subclass names the headers that carry credentials (``secret_headers``: the
    stats keep only their names) and whether the query string is recorded
    (``record_query``: not where it may carry a key)."""

    secret_headers: frozenset[str] = frozenset()
    record_query: bool = False

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats
        self.rng = random.Random(config.seed)
        self.lock = threading.Lock()
        self.seen: set[str] = set()

    def _latency(self) -> float:
        c = self.config
        if c.latency_median <= 0:
            return 0.0
        return min(
            c.latency_cap, c.latency_median * math.exp(c.latency_sigma * self.rng.gauss(0, 1))
        )

    async def _receive(
        self, scope: Scope, receive: Receive
    ) -> tuple[bytes, dict[str, str], str, float] | None:
        """Read the request and count its arrival: its body, headers (lower-case
        names), digest (which names repeats) and arrival time; ``None`` if the client
        went away first."""
        raw = await read_body(receive)
        if raw is None:
            return None
        now = time.monotonic()
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        query = parse_qsl(scope.get("query_string", b"").decode()) if self.record_query else []
        return raw, headers, self._arrive(scope, headers, raw, now, dict(query)), now

    def _arrive(
        self,
        scope: Scope,
        headers: Mapping[str, str],
        raw: bytes,
        now: float,
        query: Mapping[str, str],
    ) -> str:
        stats = self.stats
        with self.lock:
            stats.received += 1
            stats.arrivals.append(now)
            digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
            if digest in self.seen:
                stats.repeats += 1
            self.seen.add(digest)
            path = str(scope.get("path", ""))
            stats.routes[path] = stats.routes.get(path, 0) + 1
            client = scope.get("client")
            if client:
                stats.client_ports.add(int(client[1]))
            stats.last_request = {
                "path": path,
                "query": dict(query),
                # which credential headers came, never their values
                "headers": {
                    k: "<secret>" if k in self.secret_headers else v for k, v in headers.items()
                },
            }
        return digest

    @contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Count the request as being served while the block runs."""
        stats = self.stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            yield
        finally:
            stats.in_flight -= 1

    async def _wait_latency(self, roll: float, receive: Receive) -> bool:
        """Wait the latency, or hang when ``roll`` lands on ``hang_rate``; True if the
        client went away meanwhile (counted: nothing more is sent then)."""
        c = self.config
        hang = roll < c.hang_rate
        self.stats.hangs += hang
        if await sleep_or_disconnect(c.hang_seconds if hang else self._latency(), receive):
            self.stats.disconnects += 1
            return True
        return False

    async def _drop_or_malform(
        self, send: Send, roll: float, malformed: bytes, headers: Mapping[str, str]
    ) -> bool:
        """The fault table's tail: drop the connection when ``roll`` lands on
        ``drop_rate``, send ``malformed`` (True) when it lands on ``malformed_rate``."""
        stats, c = self.stats, self.config
        if 0 <= roll < c.drop_rate:
            stats.drops += 1
            await drop_connection(send)
        roll -= c.drop_rate
        if 0 <= roll < c.malformed_rate:
            stats.malformed += 1
            await send_raw(send, 200, malformed, headers)
            return True
        return False
