"""A simulated OpenAI-compatible provider on loopback, for benchmarks and tests.

Real HTTP (uvicorn) with what a provider does under load: RPM and TPM limits enforced
as token buckets with real 429s, ``retry-after`` / ``retry-after-ms`` and
``x-ratelimit-*`` headers; log-normal latency with a heavy tail; and injected 500s,
hangs, dropped connections, malformed bodies, outages and auth failures.  It counts
what it really received (arrival times, concurrency, repeats, client disconnects) so
tests assert on the provider's view, not the engine's.

Run it as a script::

    python -m adapters.simulated_server --port 8000 --rpm 3000 --latency-median 0.25

or in-process::

    with SimulatedServer(ServerConfig(rpm=3000)) as server:
        chat = OpenAIChat(base_url=server.base_url)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any, Self

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .simulated_batches import BatchService

__all__ = ["ServerConfig", "ServerStats", "SimulatedServer", "echo_answer"]

Answer = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], str]


def echo_answer(messages: Sequence[Mapping[str, Any]], params: Mapping[str, Any]) -> str:
    """The default behaviour: answer with the last message's content."""
    return str(messages[-1].get("content", "")) if messages else ""


@dataclass(kw_only=True)
class ServerConfig:
    """What the simulated provider enforces and injects.

    Rates are probabilities per request; ``retry_after`` is ``"seconds"``, ``"ms"`` or
    ``"none"`` (how 429s tell the client when to come back).
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
    reject_json_schema: bool = False
    headers: bool = True
    answer: Answer = echo_answer
    seed: int = 0
    batch_delay: float = 0.5
    batch_failure_rate: float = 0.0
    batch_expire: bool = False


@dataclass
class ServerStats:
    """What the server saw.  ``paid`` counts answered requests (what a provider bills)."""

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
    disconnects: int = 0
    repeats: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    paid_arrivals: list[float] = field(default_factory=list)

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
        data.pop("arrivals")
        data.pop("paid_arrivals")
        data["max_per_second"] = self.max_in_window(1.0)
        return data


class _Bucket:
    """A token bucket refilled continuously: ``capacity`` units, ``rate`` per second."""

    def __init__(self, per_minute: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)  # one second's worth
        self.level = self.capacity
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, amount: float) -> float:
        """Take ``amount`` if available and return 0, else the seconds until it is."""
        self._refill()
        amount = min(amount, self.capacity)
        if self.level >= amount:
            self.level -= amount
            return 0.0
        return (amount - self.level) / self.rate

    def reset_in(self) -> float:
        self._refill()
        return (self.capacity - self.level) / self.rate


class _Provider:
    """The chat-completions handler (a raw ASGI app, to watch for client disconnects)."""

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats
        self.rng = random.Random(config.seed)
        self.lock = threading.Lock()
        self.requests = _Bucket(config.rpm) if config.rpm else None
        self.tokens = _Bucket(config.tpm) if config.tpm else None
        self.seen: set[str] = set()
        self.down_until = 0.0

    def _latency(self) -> float:
        c = self.config
        if c.latency_median <= 0:
            return 0.0
        return min(
            c.latency_cap, c.latency_median * math.exp(c.latency_sigma * self.rng.gauss(0, 1))
        )

    def _limit_headers(self) -> dict[str, str]:
        if not self.config.headers:
            return {}
        out: dict[str, str] = {}
        if self.requests is not None:
            out["x-ratelimit-limit-requests"] = str(int(self.config.rpm or 0))
            out["x-ratelimit-remaining-requests"] = str(int(self.requests.level))
            out["x-ratelimit-reset-requests"] = f"{self.requests.reset_in():.3f}s"
        if self.tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(int(self.config.tpm or 0))
            out["x-ratelimit-remaining-tokens"] = str(int(self.tokens.level))
            out["x-ratelimit-reset-tokens"] = f"{self.tokens.reset_in():.3f}s"
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        stats, c = self.stats, self.config
        now = time.monotonic()
        with self.lock:
            stats.received += 1
            stats.arrivals.append(now)
            digest = hashlib.blake2b(raw, digest_size=16).hexdigest()
            if digest in self.seen:
                stats.repeats += 1
            self.seen.add(digest)

        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if c.api_key is not None and headers.get("authorization") != f"Bearer {c.api_key}":
            stats.unauthorized += 1
            await _json(
                send,
                401,
                {
                    "error": {
                        "message": "Incorrect API key provided.",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        if now < self.down_until:
            stats.outage_refusals += 1
            await _json(send, 503, {"error": {"message": "service unavailable"}})
            return
        try:
            body = json.loads(raw)
            messages = body["messages"]
        except (ValueError, KeyError, TypeError):
            await _json(send, 400, {"error": {"message": "invalid JSON body"}})
            return
        fmt = body.get("response_format")
        if c.reject_json_schema and isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            stats.rejected_format += 1
            # what llama.cpp's server answers to an unsupported response_format
            await _json(
                send,
                500,
                {
                    "error": {
                        "message": "response_format type json_schema is not supported",
                        "type": "server_error",
                    }
                },
            )
            return

        prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1
        answer, finish_reason = _cut_to_max_tokens(c.answer(messages, body), body)
        completion_tokens = len(answer) // 4 + 1
        with self.lock:
            wait = self.requests.take(1) if self.requests is not None else 0.0
            if not wait and self.tokens is not None:
                wait = self.tokens.take(prompt_tokens + completion_tokens)
                if wait and self.requests is not None:
                    self.requests.level += 1  # give the request back: refused, not served
            limit_headers = self._limit_headers()
        if wait:
            stats.rate_limited += 1
            extra = dict(limit_headers)
            if c.retry_after == "seconds":
                extra["retry-after"] = str(max(1, math.ceil(wait)))
            elif c.retry_after == "ms":
                extra["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            await _json(
                send, 429, {"error": {"message": "Rate limit reached", "type": "requests"}}, extra
            )
            return

        roll = self.rng.random()
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            hang = roll < c.hang_rate
            delay = c.hang_seconds if hang else self._latency()
            if hang:
                stats.hangs += 1
            if await _sleep_or_disconnect(delay, receive):
                stats.disconnects += 1
                return
            roll -= c.hang_rate
            if 0 <= roll < c.error_rate:
                stats.server_errors += 1
                await _json(send, 500, {"error": {"message": "internal error (injected)"}})
                return
            roll -= c.error_rate
            if 0 <= roll < c.drop_rate:
                stats.drops += 1
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", b"4096"),
                        ],
                    }
                )
                await send(
                    {"type": "http.response.body", "body": b'{"id": "chat', "more_body": True}
                )
                raise ConnectionAbortedError("injected dropped connection")
            roll -= c.drop_rate
            if 0 <= roll < c.malformed_rate:
                stats.malformed += 1
                await _raw(
                    send, 200, b'{"id": "chatcmpl-x", "choices": [{"message": ', limit_headers
                )
                return
            stats.paid += 1
            stats.paid_arrivals.append(now)
            await _json(
                send,
                200,
                {
                    "id": f"chatcmpl-{digest[:12]}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", "simulated"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": finish_reason,
                            "message": {"role": "assistant", "content": answer},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
                limit_headers,
            )
        finally:
            stats.in_flight -= 1


def _cut_to_max_tokens(answer: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """Cut an answer to the request's ``max_tokens`` (counted as this server counts, 4
    characters a token), as providers do; the finish reason says whether it was cut."""
    cap = body.get("max_tokens") or body.get("max_completion_tokens")
    if isinstance(cap, int) and cap > 0 and len(answer) // 4 + 1 > cap:
        return answer[: 4 * (cap - 1)], "length"
    return answer, "stop"


async def _sleep_or_disconnect(delay: float, receive: Receive) -> bool:
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


async def _raw(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    pairs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": body})


async def _json(
    send: Send, status: int, data: Any, headers: Mapping[str, str] | None = None
) -> None:
    await _raw(send, status, json.dumps(data).encode(), headers)


class SimulatedServer:
    """The simulated provider on 127.0.0.1, served by uvicorn in a background thread.

    Use as a context manager (sync or async); ``base_url`` is the ``/v1`` root.
    ``stats`` is live; ``take_down(seconds)`` starts an outage (503 to everything).
    """

    def __init__(self, config: ServerConfig | None = None, *, port: int = 0) -> None:
        self.config = config or ServerConfig()
        self.stats = ServerStats()
        self._provider = _Provider(self.config, self.stats)
        self.batches = BatchService(
            self.config.answer,
            delay=self.config.batch_delay,
            failure_rate=self.config.batch_failure_rate,
            expire=self.config.batch_expire,
            seed=self.config.seed,
        )
        self._port = port
        self._sock: socket.socket | None = None
        self._bound_port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> Starlette:
        async def stats(request: Request) -> JSONResponse:
            return JSONResponse(self.stats.summary())

        return Starlette(
            routes=[
                Route("/v1/chat/completions", endpoint=self._provider, methods=["POST"]),
                Route("/_stats", endpoint=stats, methods=["GET"]),
                *self.batches.routes(),
            ]
        )

    @property
    def port(self) -> int:
        assert self._bound_port, "the server is not started"
        return self._bound_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def take_down(self, seconds: float) -> None:
        self._provider.down_until = time.monotonic() + seconds

    def start(self) -> Self:
        # IPPROTO_TCP, not 0: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
        # proto says TCP, and accepted sockets inherit it.  With proto 0 every response
        # body (sent after its headers) waited for the client's delayed ACK: +40 ms.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self._port))
        self._bound_port = int(self._sock.getsockname()[1])
        config = uvicorn.Config(
            self._app(),
            log_level="critical",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            backlog=4096,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            daemon=True,
            name="simulated-provider",
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the simulated server did not start")
            self._thread.join(0.01)  # waits a moment, and returns at once if it died
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await anyio.to_thread.run_sync(self.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible provider")
    parser.add_argument("--port", type=int, default=8000)
    for name in ("rpm", "tpm"):
        parser.add_argument(f"--{name}", type=float)
    for name, default in (
        ("latency-median", 0.0),
        ("latency-sigma", 0.0),
        ("error-rate", 0.0),
        ("hang-rate", 0.0),
        ("drop-rate", 0.0),
        ("malformed-rate", 0.0),
    ):
        parser.add_argument(f"--{name}", type=float, default=default)
    parser.add_argument("--latency-cap", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", choices=("seconds", "ms", "none"), default="seconds")
    parser.add_argument("--reject-json-schema", action="store_true")
    args = parser.parse_args()
    config = ServerConfig(
        rpm=args.rpm,
        tpm=args.tpm,
        latency_median=args.latency_median,
        latency_sigma=args.latency_sigma,
        latency_cap=args.latency_cap,
        seed=args.seed,
        error_rate=args.error_rate,
        hang_rate=args.hang_rate,
        drop_rate=args.drop_rate,
        malformed_rate=args.malformed_rate,
        retry_after=args.retry_after,
        reject_json_schema=args.reject_json_schema,
    )
    with SimulatedServer(config, port=args.port) as server:
        sys.stderr.write(f"simulated provider on {server.base_url} (Ctrl-C to stop)\n")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()  # until Ctrl-C


if __name__ == "__main__":
    main()
