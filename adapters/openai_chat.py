"""`OpenAIChat`: any OpenAI-compatible chat endpoint, Azure OpenAI and gateways included.

Two transports behind one translation (``adapters._wire``):

- ``transport="aiohttp"`` (the default): one pooled, keep-alive ``aiohttp`` session per
  adapter, sized to the concurrency limit; the body is encoded once with orjson and the
  answer parsed with it.  `evaluate` through it spends about 0.17 ms of client CPU per
  request end to end; through the SDK, 1.5-1.7 ms (``benchmarks/client_cpu.py``,
  README "HTTP stack").
- ``transport="sdk"``: the official ``openai`` SDK on ``httpx2``, as before, with its
  own retries off.  For setups only the SDK handles, and for trio.

Either way the adapter never retries on its own (the engine's limiter and retry policy
see every attempt), translates every failure into the engine's error tree, reads
``x-ratelimit-*`` headers into the completion, and learns which structured-output mode
the endpoint accepts.  It owns its connections: close it with ``async with`` or
`aclose`.

Usage::

    async with OpenAIChat(base_url="http://127.0.0.1:8080/v1", limits=Limits(rpm=3000)) as chat:
        result = await evaluate(prompt, data, model=chat, metric=ExactMatch())

    azure = OpenAIChat(azure_endpoint="https://res.openai.azure.com",
                       azure_deployment="gpt-4o-mini", api_version="2024-10-21")
    gateway = OpenAIChat(base_url="https://gw.example/v1", headers={"x-team": "search"})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from engine import (
    Completion,
    ConfigError,
    Limits,
    ProviderError,
    TransientError,
)

from ._chat_base import ChatAdapter, pool_size
from ._http import DEFAULT_MAX_BODY, AiohttpTransport
from ._route import Route, azure_route, openai_route
from ._wire import (
    FormatLadder,
    RawResponse,
    parse_duration,
    parse_rate_limits,
    parse_response,
    parse_retry_after,
    resolve_api_key,
    translate_status,
)

__all__ = [
    "OpenAIChat",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "resolve_api_key",
]

Transport = Literal["aiohttp", "sdk"]
_FORMAT_STATUSES = (400, 422, 500)  # how servers reject a response_format they lack


class _Transport(Protocol):
    async def send(self, payload: dict[str, Any]) -> RawResponse: ...

    async def aclose(self) -> None: ...


def _transport(
    kind: str, route: Route, *, pool: int, timeout: float, endpoint: str, max_body: int
) -> _Transport:
    if kind == "aiohttp":
        return AiohttpTransport(
            route, pool=pool, timeout=timeout, endpoint=endpoint, max_body=max_body
        )
    if kind == "sdk":
        from ._sdk import SdkTransport  # the SDK is imported only by those who use it

        return SdkTransport(route, pool=pool, timeout=timeout, endpoint=endpoint, max_body=max_body)
    raise ConfigError(f"transport must be 'aiohttp' or 'sdk', got {kind!r}")


def _route(
    base_url: str | None,
    api_key: str | None,
    azure: tuple[str | None, str | None, str | None],
    headers: Mapping[str, str] | None,
    query: Mapping[str, str] | None,
) -> Route:
    endpoint, deployment, version = azure
    if endpoint is None:
        if deployment is not None or version is not None:
            raise ConfigError("azure_deployment and api_version need azure_endpoint")
        return openai_route(base_url=base_url, api_key=api_key, headers=headers, query=query)
    if base_url is not None:
        raise ConfigError("pass base_url or azure_endpoint, not both")
    return azure_route(
        azure_endpoint=endpoint,
        azure_deployment=deployment,
        api_version=version,
        api_key=api_key,
        headers=headers,
        query=query,
    )


class OpenAIChat(ChatAdapter):
    """An OpenAI-compatible chat model; implements `engine.ChatModel`.

    Parameters:
        base_url: the API root (``http://127.0.0.1:8080/v1``); default
            ``$OPENAI_BASE_URL``, else OpenAI's.  Must not carry credentials.
        api_key: the key; default ``$OPENAI_API_KEY`` (``$AZURE_OPENAI_API_KEY`` for
            Azure).  A custom ``base_url`` may go without one (local servers).
        limits: the endpoint's `Limits` (picked up by `engine.Endpoint`); its
            concurrency also sizes the connection pool (default 32).
        timeout: seconds for one HTTP request (connecting alone is capped at 5 s, or
            half the timeout when that is shorter).
            The engine's `RetryPolicy.timeout` bounds the whole attempt as well.
        name: label for events and errors; default host and path of the endpoint.
        transport: ``"aiohttp"`` (lean, the default) or ``"sdk"`` (the openai SDK).
        azure_endpoint, azure_deployment, api_version: an Azure OpenAI deployment
            (``https://RES.openai.azure.com``); sends ``api-key`` and ``?api-version=``.
        headers: extra headers on every request (gateways); they override the
            adapter's own by name, ``Authorization`` included.
        query: extra query parameters on every request (gateways).
        max_response_bytes: the largest answer accepted (default 16 MiB); a larger
            one fails its call with a `PermanentError` naming the cap, not retried.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        timeout: float = 120.0,
        name: str | None = None,
        transport: Transport = "aiohttp",
        azure_endpoint: str | None = None,
        azure_deployment: str | None = None,
        api_version: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        max_response_bytes: int = DEFAULT_MAX_BODY,
    ) -> None:
        # what __reduce__ rebuilds this object from in another process (a cluster worker)
        self._keep_arguments(
            base_url=base_url,
            api_key=api_key,
            limits=limits,
            timeout=timeout,
            name=name,
            transport=transport,
            azure_endpoint=azure_endpoint,
            azure_deployment=azure_deployment,
            api_version=api_version,
            headers=headers,
            query=query,
            max_response_bytes=max_response_bytes,
        )
        if (
            not isinstance(max_response_bytes, int)
            or isinstance(max_response_bytes, bool)
            or max_response_bytes < 1
        ):
            raise ConfigError(
                f"max_response_bytes must be a positive int, got {max_response_bytes!r}"
            )
        route = _route(
            base_url, api_key, (azure_endpoint, azure_deployment, api_version), headers, query
        )
        self._take_identity(route.identity, route.secrets, name=name or route.label, limits=limits)
        self.transport = transport
        self._transport = _transport(
            transport,
            route,
            pool=pool_size(limits),
            timeout=timeout,
            endpoint=self.name,
            max_body=max_response_bytes,
        )
        self._ladder = FormatLadder()

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its constructor arguments: a cluster worker gets its own session
        and pool; no live connection crosses processes.  An ``api_key`` given explicitly
        travels with it; one read from the environment is read again where it is
        unpickled.  The structured-output mode learned so far goes along, so both sides
        send (and cache under) the same response format."""
        return (*super().__reduce__(), {"format_mode": self._ladder.mode})

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self._ladder.mode = str(state["format_mode"])

    @property
    def format_mode(self) -> str:
        """``json_schema``, ``json_object`` or ``text``: what this endpoint supports."""
        return self._ladder.mode

    def response_format_sent(self, requested: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The ``response_format`` a request asking for ``requested`` would carry now,
        given what the endpoint has refused so far (``None``: none, plain text)."""
        sent = self._ladder.outgoing(requested)
        return sent if isinstance(sent, Mapping) else None

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._transport.aclose()

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        requested = params.pop("response_format", None)
        mode = self._ladder.mode
        if requested is not None:
            sent = self._ladder.outgoing(requested)
            if sent is not None:
                params["response_format"] = sent
        raw = await self._transport.send({"messages": messages, **params})
        if 200 <= raw.status < 300:
            return parse_response(raw, endpoint=self.name)
        raise self._failure(raw, requested, mode)

    def _failure(self, raw: RawResponse, requested: Any, sent_mode: str) -> ProviderError:
        if raw.status in _FORMAT_STATUSES and self._ladder.step_down(
            requested, sent_mode, raw.body
        ):
            return TransientError(
                f"endpoint rejected response_format; falling back to {self._ladder.mode}",
                endpoint=self.name,
                status=raw.status,
            )
        return translate_status(
            raw.status, raw.headers, raw.body, endpoint=self.name, secrets=self._secrets
        )

    def __repr__(self) -> str:
        return f"<OpenAIChat {self.name!r} transport={self.transport} format={self._ladder.mode}>"
