"""A simulated OpenAI-compatible provider on loopback, for benchmarks and tests.

Real HTTP (uvicorn) with what a provider does under load: RPM and TPM limits enforced
as token buckets with real 429s, ``retry-after`` / ``retry-after-ms`` and
``x-ratelimit-*`` headers; log-normal latency with a heavy tail; and injected 500s,
hangs, dropped connections, malformed bodies, outages, auth failures, an exhausted
quota (429 ``insufficient_quota``) and answers without text (refusals, tool calls,
content filters).  It serves OpenAI's route and Azure's deployment route
(``/openai/deployments/{d}/chat/completions?api-version=``, ``api-key`` header).  It
counts what it really received (arrival times, concurrency, repeats, client
disconnects, routes, connections, the last request's headers) so tests assert on the
provider's view, not the engine's.

Run it as a script::

    python -m adapters.simulated_server --port 8000 --rpm 3000 --latency-median 0.25
    python -m adapters.simulated_server --quota-exhausted          # a dead account
    python -m adapters.simulated_server --null-content-rate 0.1 --null-content-kind refusal

or in-process::

    with SimulatedServer(ServerConfig(rpm=3000)) as server:
        chat = OpenAIChat(base_url=server.base_url)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import _fake
from ._simulated_anthropic_batches import AnthropicBatchService
from ._simulated_base import (
    Bucket,
    ServerConfig,
    ServerStats,
    SimulatedHandler,
    echo_answer,
    parse_chat_request,
    send_json,
    send_raw,
)
from ._simulated_native import native_routes
from .simulated_batches import BatchService

__all__ = [
    "ServerConfig",
    "ServerStats",
    "SimulatedServer",
    "echo_answer",
    "main",
    "wait_until_listening",
]


class _Provider(SimulatedHandler):
    """The chat-completions handler (a raw ASGI app, to watch for client disconnects).

    One request goes: read the body, count its arrival, refuse it (credentials, outage,
    Azure without api-version, exhausted quota, bad JSON, unsupported response format),
    rate-limit it, then serve it with latency and the injected faults.
    """

    secret_headers = frozenset({"authorization", "api-key"})
    record_query = True

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        super().__init__(config, stats)  # one draw per request: seeded runs stay comparable
        self.requests = Bucket(config.rpm) if config.rpm else None
        self.tokens = Bucket(config.tpm) if config.tpm else None
        self.down_until = 0.0
        self._slots: anyio.Semaphore | None = None  # made on the server's loop, on first use

    def _slot(self) -> anyio.Semaphore:
        if self._slots is None:
            self._slots = anyio.Semaphore(self.config.slots or 1, fast_acquire=True)
        return self._slots

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
        if self.config.announce_limit_requests is not None:
            out["x-ratelimit-limit-requests"] = self.config.announce_limit_requests
        if self.config.announce_limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = self.config.announce_limit_tokens
        return out

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = await self._receive(scope, receive)
        if received is None:
            return
        raw, headers, digest, now = received
        body = parse_chat_request(raw)
        refusal = self._refusal(scope, headers, now) or self._request_refusal(body)
        if refusal is not None or body is None:
            await send_json(send, *(refusal or _INVALID_JSON))
            return
        answer = self.config.answer(body["messages"], body)
        billed, _ = _fake.cut_to_max_tokens(answer, body)  # what the token bucket is charged
        wait, limit_headers = self._take(_fake.prompt_tokens(body["messages"]), billed)
        if wait:
            await self._rate_limited(send, wait, limit_headers)
            return
        if self.config.slots is None:
            await self._serve(send, receive, body, answer, digest, now, limit_headers)
            return
        # A one-slot (or N-slot) server: queue for a slot, then serve to the end even
        # if the client is gone by then (llama.cpp works off its queue the same way).
        with anyio.CancelScope(shield=True):
            async with self._slot():
                await self._serve(
                    send, _never_disconnects, body, answer, digest, now, limit_headers
                )

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        key = self.config.api_key
        if key is None:
            return True
        if headers.get("authorization") == f"Bearer {key}":
            return True
        return self.config.api_key_header and headers.get("api-key") == key

    def _refusal(
        self, scope: Scope, headers: Mapping[str, str], now: float
    ) -> tuple[int, Any] | None:
        """The answer to a request refused before it is read: status and body."""
        stats = self.stats
        if not self._authorized(headers):
            stats.unauthorized += 1
            message = "Incorrect API key provided."
            return 401, _error(message, type="invalid_request_error")
        if now < self.down_until:
            stats.outage_refusals += 1
            return 503, _error("service unavailable")
        if str(scope.get("path", "")).startswith("/openai/") and b"api-version=" not in scope.get(
            "query_string", b""
        ):
            stats.not_found += 1  # what Azure answers without ?api-version=
            return 404, {"error": {"code": "404", "message": "Resource not found"}}
        if self.config.quota_exhausted:
            stats.quota_refusals += 1
            return 429, _error(_QUOTA_MESSAGE, type="insufficient_quota", code="insufficient_quota")
        return None

    def _request_refusal(self, body: Mapping[str, Any] | None) -> tuple[int, Any] | None:
        """The answer to a body this server will not serve: not JSON, or a format it
        does not support."""
        if body is None:
            return _INVALID_JSON
        fmt = body.get("response_format")
        if (
            self.config.reject_json_schema
            and isinstance(fmt, dict)
            and fmt.get("type") == "json_schema"
        ):
            self.stats.rejected_format += 1
            # what llama.cpp's server answers to an unsupported response_format
            message = "response_format type json_schema is not supported"
            return 500, _error(message, type="server_error")
        return None

    def _take(self, prompt_tokens: int, answer: str) -> tuple[float, dict[str, str]]:
        """Take one request and its tokens from the buckets: the wait if refused."""
        with self.lock:
            wait = self.requests.take(1) if self.requests is not None else 0.0
            if not wait and self.tokens is not None:
                wait = self.tokens.take(prompt_tokens + _fake.completion_tokens(answer))
                if wait and self.requests is not None:
                    self.requests.level += 1  # give the request back: refused, not served
            return wait, self._limit_headers()

    async def _rate_limited(self, send: Send, wait: float, limit_headers: dict[str, str]) -> None:
        self.stats.rate_limited += 1
        extra = dict(limit_headers)
        if self.config.retry_after == "seconds":
            extra["retry-after"] = str(max(1, math.ceil(wait)))
        elif self.config.retry_after == "ms":
            extra["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        await send_json(send, 429, _error("Rate limit reached", type="requests"), extra)

    async def _serve(
        self,
        send: Send,
        receive: Receive,
        body: Mapping[str, Any],
        answer: str,
        digest: str,
        now: float,
        limit_headers: dict[str, str],
    ) -> None:
        """Wait the latency (or hang), then answer: a fault, or the paid completion."""
        stats, c = self.stats, self.config
        roll = self.rng.random()  # one draw per request: seeded runs stay comparable
        with self._in_flight():
            if await self._wait_latency(roll, receive):
                return
            roll -= c.hang_rate
            if await self._fault(send, roll, limit_headers):
                return
            roll -= c.error_rate + c.drop_rate + c.malformed_rate
            kind = c.null_content_kind if 0 <= roll < c.null_content_rate else None
            stats.paid += 1
            stats.paid_arrivals.append(now)
            if kind is not None:
                stats.null_contents += 1
            if c.body is not None:
                await (_chunked if c.chunked else send_raw)(send, 200, c.body, limit_headers)
                return
            completion = _fake.completion_body(
                f"chatcmpl-{digest[:12]}", body, answer, null_content=kind
            )
            if c.usage is not None:
                completion["usage"] = {**completion["usage"], **c.usage}
            await send_json(send, 200, completion, limit_headers)

    async def _fault(self, send: Send, roll: float, limit_headers: dict[str, str]) -> bool:
        """Serve the injected fault ``roll`` lands on, if any; True when one was served.

        The fault table: each rate takes its slice of one uniform draw, in this order
        (hangs before it, null contents after it, in `_serve`).
        """
        stats, c = self.stats, self.config
        if 0 <= roll < c.error_rate:
            stats.server_errors += 1
            await send_json(send, 500, _error("internal error (injected)"))
            return True
        roll -= c.error_rate
        malformed = b'{"id": "chatcmpl-x", "choices": [{"message": '
        return await self._drop_or_malform(send, roll, malformed, limit_headers)


async def _never_disconnects() -> dict[str, Any]:
    """A `Receive` for a request served whatever the client does."""
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


def _error(message: str, **fields: str) -> dict[str, Any]:
    return {"error": {"message": message, **fields}}


_INVALID_JSON = (400, _error("invalid JSON body"))
_QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


async def _chunked(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    """``body`` with no Content-Length, in pieces (HTTP/1.1 chunked transfer)."""
    pairs = [(b"content-type", b"application/json")]
    pairs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    step = 64 * 1024
    for start in range(0, len(body), step):
        piece = body[start : start + step]
        await send({"type": "http.response.body", "body": piece, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


class SimulatedServer:
    """The simulated provider on 127.0.0.1, served by uvicorn in a background thread.

    Use as a context manager (sync or async); ``base_url`` is the ``/v1`` root and
    ``azure_endpoint`` the root of its Azure route
    (``/openai/deployments/{deployment}/chat/completions?api-version=...``).
    ``stats`` is live; ``take_down(seconds)`` starts an outage (503 to everything).

    ``fast=True`` serves with uvloop and httptools where installed (benchmarks of the
    client); by default the server runs on asyncio and h11, the same everywhere.
    """

    def __init__(
        self, config: ServerConfig | None = None, *, port: int = 0, fast: bool = False
    ) -> None:
        self.config = config or ServerConfig()
        if self.config.null_content_kind not in _fake.NULL_CONTENT_KINDS:
            raise ValueError(f"null_content_kind must be one of {_fake.NULL_CONTENT_KINDS}")
        self.stats = ServerStats()
        self._provider = _Provider(self.config, self.stats)
        self.batches = BatchService(
            self.config.answer,
            delay=self.config.batch_delay,
            failure_rate=self.config.batch_failure_rate,
            expire=self.config.batch_expire,
            seed=self.config.seed,
            null_content_rate=self.config.null_content_rate,
            null_content_kind=self.config.null_content_kind,
        )
        self.anthropic_batches = AnthropicBatchService(self.config)  # /v1/messages/batches
        self._fast = fast
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
                Route(
                    "/openai/deployments/{deployment}/chat/completions",
                    endpoint=self._provider,
                    methods=["POST"],
                ),
                Route("/_stats", endpoint=stats, methods=["GET"]),
                *self.batches.routes(),
                # the native dialects hang beside OpenAI's (always served), routed by path
                *native_routes(self.config, self.stats, self.config.dialects),
                *self.anthropic_batches.routes(),
            ]
        )

    @property
    def port(self) -> int:
        assert self._bound_port, "the server is not started"
        return self._bound_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        """The root the native dialects' adapters take as ``base_url`` (Anthropic's
        ``/v1/messages`` and Gemini's ``/v1beta/models/...`` hang under it)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def azure_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
            loop="auto" if self._fast else "asyncio",
            http="auto" if self._fast else "h11",
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


def wait_until_listening(
    port: int, process: subprocess.Popen[bytes], *, timeout: float = 20.0
) -> None:
    """Block until a server started as ``process`` accepts connections on ``port``
    (``python -m adapters.simulated_server`` in tests and benchmarks)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"no server came up on port {port}")
        time.sleep(0.05)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible provider")
    parser.add_argument("--port", type=int, default=8000)
    for name in ("rpm", "tpm"):
        parser.add_argument(f"--{name}", type=float)
    for name, default in (
        ("latency-median", 0.0),
        ("latency-sigma", 0.0),
        ("latency-cap", 30.0),
        ("error-rate", 0.0),
        ("hang-rate", 0.0),
        ("hang-seconds", 30.0),
        ("drop-rate", 0.0),
        ("malformed-rate", 0.0),
        ("null-content-rate", 0.0),
    ):
        parser.add_argument(f"--{name}", type=float, default=default)
    parser.add_argument("--null-content-kind", choices=_fake.NULL_CONTENT_KINDS, default="refusal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--slots", type=int, help="serve this many requests at a time, queue the rest"
    )
    parser.add_argument("--retry-after", choices=("seconds", "ms", "none"), default="seconds")
    parser.add_argument("--reject-json-schema", action="store_true")
    parser.add_argument("--quota-exhausted", action="store_true", help="429 insufficient_quota")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer)")
    parser.add_argument("--api-key-header", action="store_true", help="also accept api-key:")
    parser.add_argument("--fast", action="store_true", help="uvloop + httptools if installed")
    _native_options(parser)
    return parser


def _native_options(parser: argparse.ArgumentParser) -> None:
    """The options of the native dialects (Anthropic, Gemini)."""
    parser.add_argument(
        "--dialect",
        dest="dialects",
        action="append",
        choices=("openai", "anthropic", "gemini"),
        help="serve this native dialect beside OpenAI's (repeat for several; default: all)",
    )
    for name in ("input-tpm", "output-tpm"):
        parser.add_argument(f"--{name}", type=float)
    parser.add_argument("--overloaded-rate", type=float, default=0.0, help="529 / 503 overloaded")
    parser.add_argument("--spend-limit", action="store_true", help="Anthropic spend limit reached")
    parser.add_argument("--daily-quota", action="store_true", help="Gemini daily quota exhausted")
    parser.add_argument("--throttle-after", type=int, help="429s after this many paid requests")
    parser.add_argument("--throttle-seconds", type=float, default=3.0)


def main() -> None:
    args = vars(_parser().parse_args())
    port, fast = args.pop("port"), args.pop("fast")
    args["dialects"] = tuple(args["dialects"] or ("openai", "anthropic", "gemini"))
    config = ServerConfig(**args)
    with SimulatedServer(config, port=port, fast=fast) as server:
        sys.stderr.write(f"simulated provider on {server.base_url} (Ctrl-C to stop)\n")
        for dialect in set(config.dialects) - {"openai"}:
            sys.stderr.write(f"  {dialect} dialect: base_url {server.root_url}\n")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()  # until Ctrl-C


if __name__ == "__main__":
    main()
