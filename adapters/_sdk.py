"""The SDK transport: the official ``openai`` client on ``httpx2``, as an option.

``OpenAIChat(transport="sdk")`` posts through the SDK's generic ``post`` (its auth,
base URL, Azure routing, headers; not the typed-request transform, a recursive walk
over every message) with the SDK's own retries off.  Its status errors are handed back
as a `RawResponse`, so the translation into the engine's errors is the same code as
for the lean transport (`adapters._wire`).  It costs several times the lean
transport's CPU per request (``benchmarks/client_cpu.py``); it is here for servers or
setups only the SDK handles, and for trio (the lean transport needs asyncio).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import httpx2
import openai

from engine import CallTimeoutError, ConfigError, ConnectionFailedError, TransientError

from ._http import DEFAULT_MAX_BODY, connect_failure_reason, too_large
from ._route import Route
from ._wire import RawResponse

__all__ = ["SdkTransport"]


def _client(route: Route, http: httpx2.AsyncClient, timeout: float) -> openai.AsyncOpenAI:
    common: dict[str, Any] = {
        "max_retries": 0,  # the engine's retry policy must see every attempt
        "http_client": http,
        "timeout": timeout,
        "default_headers": dict(route.user_headers) or None,
        "default_query": dict(route.user_query) or None,
    }
    if route.azure_endpoint is None:
        return openai.AsyncOpenAI(api_key=route.api_key, base_url=route.base_url, **common)
    # The SDK insists on a credential of its own: take the caller's header when the
    # key came that way (an api-key header, or an Entra ID bearer token).
    given = {name.lower(): value for name, value in route.user_headers.items()}
    key = route.api_key or given.get("api-key")
    bearer = given.get("authorization", "")
    token = bearer.split(" ", 1)[-1] if bearer and not key else None
    return openai.AsyncAzureOpenAI(
        azure_endpoint=route.azure_endpoint,
        azure_deployment=route.azure_deployment,
        api_version=route.api_version,
        api_key=key,
        azure_ad_token=token,
        **common,
    )


class SdkTransport:
    """POSTs to one `Route` through ``openai.AsyncOpenAI`` (or ``AsyncAzureOpenAI``)."""

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
        self._endpoint = endpoint
        self._pool, self._timeout = pool, timeout
        self._client = self._make_client()
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop its pool is of
        self._closer: AsyncGenerator[None, None] | None = None  # closes it at loop end

    def _make_client(self) -> openai.AsyncOpenAI:
        http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=self._pool, max_keepalive_connections=self._pool),
            timeout=httpx2.Timeout(self._timeout, connect=min(5.0, self._timeout)),
        )
        return _client(self._route, http, self._timeout)

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve from ``loop``: the first time, or after the loop the pool was of ended
        (its connections died with it: a fresh client).  The client closes when the
        loop shuts down or this transport is collected (as in `AiohttpTransport`)."""
        old = self._loop
        if old is not None:
            if old.is_running() and not old.is_closed():
                raise ConfigError(
                    f"this adapter ({self._endpoint}) is in use by another event loop "
                    "(another thread's asyncio.run); create one adapter per loop"
                )
            self._client = self._make_client()
        self._loop = loop
        closer = self._closer = _close_at_loop_end(self._client)
        await anext(closer)

    async def send(self, payload: dict[str, Any]) -> RawResponse:
        """POST ``payload`` as JSON; the whole answer, whatever its status."""
        loop = _running_loop()
        if loop is not self._loop and loop is not None:  # None: trio, one run per client
            await self._bind(loop)
        body = {**payload, "messages": [dict(m) for m in payload["messages"]]}
        try:
            response = await self._client.post(
                "/chat/completions", body=body, cast_to=httpx2.Response
            )
        except openai.APIStatusError as exc:
            failed = exc.response
            return self._capped(RawResponse(failed.status_code, failed.headers, failed.content))
        except openai.APITimeoutError as exc:
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                raise self._unreachable("connect timeout") from exc
            raise CallTimeoutError("the HTTP request timed out", endpoint=self._endpoint) from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, httpx2.ConnectError):
                raise self._unreachable(connect_failure_reason(cause)) from exc
            raise TransientError(
                f"connection failed: {type(cause).__name__}", endpoint=self._endpoint
            ) from exc
        return self._capped(RawResponse(response.status_code, response.headers, response.content))

    def _capped(self, raw: RawResponse) -> RawResponse:
        # The SDK has read the body already: the cap keeps the engine's promise (an
        # over-size answer is an error, never parsed) though not the memory.
        if len(raw.body) > self._max_body:
            raise too_large(self._max_body, self._endpoint, raw.status)
        return raw

    def _unreachable(self, reason: str) -> ConnectionFailedError:
        return ConnectionFailedError(
            f"cannot reach {self._route.display}: {reason}", endpoint=self._endpoint
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        closer, self._closer = self._closer, None
        if closer is not None and self._loop is _running_loop():
            await closer.aclose()  # closes the client
        else:
            await self._client.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # trio
        return None


async def _close_at_loop_end(client: openai.AsyncOpenAI) -> AsyncGenerator[None, None]:
    """Yields once, then closes ``client`` when finalised (see `SdkTransport._bind`)."""
    try:
        yield
    finally:
        await client.close()
