"""The lean HTTP transport: one pooled aiohttp session per adapter.

A transport turns a request payload into a `RawResponse` and nothing else: it does not
retry (the engine's limiter and retry policy must see every attempt) and it does not
read statuses (`adapters._wire` does, the same way for every transport).  What it
does translate is what only it can see, the failures below HTTP:

    could not connect (refused, unknown host, connect timeout, TLS)   ConnectionFailedError
    no complete answer within the timeout                             CallTimeoutError
    dropped mid-request or mid-response, reset, bad framing           TransientError

Why aiohttp: against an instant server at 100 requests in flight, a plain aiohttp
client spends about a seventh of the CPU per request of plain ``httpx2`` and a
fourteenth of the OpenAI SDK's typed create (``benchmarks/client_cpu.py``).  The body
is encoded once with orjson; the session is made lazily, on the running loop, on
first use.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import urllib.request
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import aiohttp
from yarl import URL

from engine import (
    CallTimeoutError,
    ConfigError,
    ConnectionFailedError,
    PermanentError,
    TransientError,
)

from ._route import Route
from ._wire import RawResponse, encode_json, scrub

__all__ = ["DEFAULT_MAX_BODY", "AiohttpTransport", "connect_failure_reason", "too_large"]

# The largest answer read by default: a chat completion is kilobytes; a body of many
# megabytes is a broken or hostile server, and holding it costs memory per call.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
_CHUNK = 64 * 1024

# Connecting is bounded on its own so a dead host fails fast, whatever the call timeout;
# below the whole request's timeout, so that a connect that hangs is reported as one.
_CONNECT_TIMEOUT = 5.0
# Idle keep-alive connections are closed after this long: servers drop theirs (uvicorn
# after 5 s, nginx 75 s), and reusing one the server is closing fails that request.
_KEEPALIVE = 15.0


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its causes and wrapped OS errors, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo += [getattr(item, "os_error", None), item.__cause__, item.__context__]


def connect_failure_reason(exc: BaseException) -> str:
    """A few words saying why a connection could not be made: ``connection refused``,
    ``unknown host``, ``connect timeout``, ``TLS error: ...``."""
    for item in _chain(exc):
        if isinstance(item, socket.gaierror | aiohttp.ClientConnectorDNSError):
            return "unknown host"
        if isinstance(item, ConnectionRefusedError) or getattr(item, "errno", None) == (
            errno.ECONNREFUSED
        ):
            return "connection refused"
        # httpx2's ConnectTimeout is not a TimeoutError; named so the SDK stays optional
        if isinstance(item, TimeoutError) or type(item).__name__ == "ConnectTimeout":
            return "connect timeout"
        if isinstance(item, ssl.SSLError):
            return f"TLS error: {item.reason or item}"
        code = getattr(item, "errno", None)
        if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return "host unreachable" if code == errno.EHOSTUNREACH else "network unreachable"
    return f"{type(exc).__name__}: {exc}"


def too_large(cap: int, endpoint: str, status: int | None) -> PermanentError:
    """The error of an answer over ``cap`` bytes: not retried (it would come again)."""
    return PermanentError(
        f"the answer is larger than max_response_bytes={cap} ({cap / 2**20:g} MiB); "
        "not read. Raise OpenAIChat(max_response_bytes=...) if such answers are expected",
        endpoint=endpoint,
        status=status,
    )


def _env_proxy(url: URL) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``NO_PROXY``...),
    read once: the SDK's httpx honours these too, and reading them per request costs."""
    host = url.host or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(url.scheme)


class AiohttpTransport:
    """POSTs JSON to one `Route` over a pooled, keep-alive aiohttp session.

    Parameters:
        route: where to send, with which headers.
        pool: most connections open at once (the endpoint's concurrency).
        timeout: seconds for one whole request; connecting alone is capped at 5 s
            (half the timeout when that is shorter).
        endpoint: the label errors carry.
        max_body: the largest answer accepted, in bytes (`PermanentError` beyond).
    """

    __slots__ = (
        "_closer",
        "_endpoint",
        "_loop",
        "_max_body",
        "_pool",
        "_proxy",
        "_route",
        "_session",
        "_timeout",
        "_url",
    )

    def __init__(
        self,
        route: Route,
        *,
        pool: int,
        timeout: float,
        endpoint: str,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self._route = route
        self._max_body = max_body
        self._url = URL(route.url, encoded=True)
        self._pool = pool
        self._timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(_CONNECT_TIMEOUT, timeout / 2)
        )
        self._endpoint = endpoint
        self._proxy = _env_proxy(self._url)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closer: AsyncGenerator[None, None] | None = None  # closes the session

    async def _open(self) -> aiohttp.ClientSession:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "transport='aiohttp' needs an asyncio event loop; use transport='sdk' on trio"
            ) from None
        # A session belongs to one loop.  Another loop still running owns it; one that
        # has ended closed it on its way out (`_close_at_loop_end`), or left it behind.
        old = self._loop
        if self._session is not None and not self._session.closed:
            if old is not None and old is not loop and old.is_running() and not old.is_closed():
                raise ConfigError(
                    f"this adapter ({self._endpoint}) is in use by another event loop "
                    "(another thread's asyncio.run); create one adapter per loop"
                )
            _abandon(self._session)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self._pool, limit_per_host=0, keepalive_timeout=_KEEPALIVE
            ),
            headers=self._route.headers,
            timeout=self._timeout,
            proxy=self._proxy,
            cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies
            auto_decompress=True,
        )
        self._session, self._loop = session, loop
        # Started here, the generator is one the loop finalises when it shuts down
        # (asyncio.run does) or when it is collected with this transport: the session
        # closes on its own loop, and an adapter nobody closed leaves no warning behind.
        closer = self._closer = _close_at_loop_end(session)
        await anext(closer)
        return session

    async def send(self, payload: dict[str, Any]) -> RawResponse:
        """POST ``payload`` as JSON; the whole answer, whatever its status."""
        session = self._session
        if session is None or self._loop is not asyncio.get_running_loop():
            session = await self._open()
        body = encode_json(payload)
        try:
            # Cancellation (the engine's deadline, a cancelled run) closes the
            # connection instead of returning it to the pool half-read.
            async with session.post(self._url, data=body, allow_redirects=False) as response:
                data = await self._read(response)
                return RawResponse(response.status, response.headers, data)
        except aiohttp.ClientConnectorError as exc:
            raise self._unreachable(connect_failure_reason(exc)) from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise self._unreachable("connect timeout") from exc
        except TimeoutError as exc:  # total or socket-read timeout
            raise CallTimeoutError("the HTTP request timed out", endpoint=self._endpoint) from exc
        except (aiohttp.ClientError, OSError) as exc:
            detail = scrub(f"{type(exc).__name__}: {exc}", self._route.secrets)
            raise TransientError(f"connection failed: {detail}", endpoint=self._endpoint) from exc

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The whole body, or `ResponseTooLarge` past ``max_body`` bytes (read no further:
        the connection is closed rather than drained)."""
        cap = self._max_body
        length = response.content_length
        if length is not None and length <= cap:
            return await response.read()  # the fast path: size known and allowed
        if length is None:  # chunked: count as it comes
            chunks, size = [], 0
            async for chunk in response.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > cap:
                    break
                chunks.append(chunk)
            else:
                return b"".join(chunks)
        response.close()
        raise too_large(cap, self._endpoint, response.status)

    def _unreachable(self, reason: str) -> ConnectionFailedError:
        return ConnectionFailedError(
            f"cannot reach {self._route.display}: {reason}", endpoint=self._endpoint
        )

    async def aclose(self) -> None:
        """Close the pooled connections (idempotent)."""
        session, self._session = self._session, None
        closer, self._closer = self._closer, None
        if session is None or session.closed:
            return
        if self._loop is asyncio.get_running_loop() and closer is not None:
            await closer.aclose()  # closes the session
        else:
            _abandon(session)


async def _close_at_loop_end(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Yields once, then closes ``session`` when finalised (see `AiohttpTransport._open`)."""
    try:
        yield
    finally:
        await session.close()


def _abandon(session: aiohttp.ClientSession) -> None:
    """Let go of a session made under an event loop that has ended, quietly: nothing
    can be awaited on that loop any more; the sockets close as they are collected."""
    connector = session.connector
    session.detach()
    if connector is not None:
        # The synchronous half of close(): marks the connector closed; its loop is gone,
        # so there is nothing to await (close() itself is a coroutine).
        connector._close()
