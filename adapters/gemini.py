"""`GeminiChat`: Google's Gemini API (``generateContent``), natively.

The same lean path as `OpenAIChat` (pooled aiohttp, orjson), with the Gemini dialect
(``adapters._gemini_wire``): ``POST {base_url}/v1beta/models/{model}:generateContent``
with the key in ``x-goog-api-key``; system messages as ``systemInstruction``, turns as
``user`` / ``model``; temperature, ``max_tokens`` and JSON output (``response_format``
as ``responseMimeType`` / ``responseSchema``) in ``generationConfig``.

Gemini announces no rate limits in headers.  A ``429 RESOURCE_EXHAUSTED`` carries a
``RetryInfo`` ``retryDelay``, which becomes the `RateLimitedError`'s ``retry_after``: the
endpoint's pause gate closes once for every worker.  A ``QuotaFailure`` naming a per-day
quota is `QuotaExceededError` (fatal: waiting minutes will not help).  ``finishReason``
``SAFETY`` / ``RECITATION`` / ``PROHIBITED_CONTENT`` is a `NoContentError` outcome.

Usage::

    async with GeminiChat(model="gemini-2.5-flash", limits=Limits(rpm=1000)) as gemini:
        result = await evaluate(prompt, data, model=gemini, metric=ExactMatch())

The prompt's ``model`` parameter, when set, picks the model per request; ``model=``
here is the default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from engine import Completion, ConfigError, Limits

from ._chat_base import ChatAdapter, pool_size
from ._gemini_wire import encode_request, gemini_response_format, parse_response, translate_status
from ._http import AiohttpTransport
from ._native_route import Dialect, native_route
from ._route import Route

__all__ = ["GEMINI", "GeminiChat"]

GEMINI = Dialect(
    kind="gemini",
    default_base_url="https://generativelanguage.googleapis.com",
    base_url_env="GEMINI_BASE_URL",
    api_key_env="GEMINI_API_KEY",
    key_header="x-goog-api-key",
)


class GeminiChat(ChatAdapter):
    """A Gemini model behind ``generateContent``; implements `engine.ChatModel`.

    Parameters:
        model: the model asked when the prompt names none (``gemini-2.5-flash``).
        base_url: the API root, without ``/v1beta`` (Google's by default, or
            ``$GEMINI_BASE_URL``).  Must not carry credentials.
        api_key: the key; default ``$GEMINI_API_KEY``.  A custom ``base_url`` may go
            without one.
        limits: the endpoint's `Limits`; its concurrency sizes the connection pool.
        timeout: seconds for one HTTP request.
        name: label for events and errors; default host and path of the root.
        headers, query: extra headers and query parameters on every request.
    """

    def __init__(
        self,
        *,
        model: str = "gemini-2.5-flash",
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        timeout: float = 120.0,
        name: str | None = None,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> None:
        self._keep_arguments(
            model=model,
            base_url=base_url,
            api_key=api_key,
            limits=limits,
            timeout=timeout,
            name=name,
            headers=headers,
            query=query,
        )
        if not isinstance(model, str) or not model:
            raise ConfigError(f"model must be a model name, got {model!r}")
        route = self._route(model)  # checks the arguments now, not at the first call
        self._take_identity(route.identity, route.secrets, name=name or route.label, limits=limits)
        self.model = model
        self._pool = pool_size(limits)
        self._transports: dict[str, AiohttpTransport] = {}  # one per model: the URL names it

    def _route(self, model: str) -> Route:
        a = self._arguments
        return native_route(
            GEMINI,
            base_url=a["base_url"],
            path=f"/v1beta/models/{quote(model, safe='')}:generateContent",
            api_key=a["api_key"],
            headers=a["headers"],
            query=a["query"],
        )

    def _transport(self, model: str) -> AiohttpTransport:
        transport = self._transports.get(model)
        if transport is None:
            transport = AiohttpTransport(
                self._route(model),
                pool=self._pool,
                timeout=self._arguments["timeout"],
                endpoint=self.name,
            )
            self._transports[model] = transport
        return transport

    def response_format_sent(self, requested: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The ``generationConfig`` JSON fields a request asking for ``requested``
        carries (``None``: plain text)."""
        return gemini_response_format(requested) or None

    async def aclose(self) -> None:
        """Close the pooled connections."""
        for transport in self._transports.values():
            await transport.aclose()

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        model = params.get("model") or self.model
        raw = await self._transport(str(model)).send(encode_request(messages, params))
        return self._read_answer(raw, parse_response, translate_status)

    def __repr__(self) -> str:
        return f"<GeminiChat {self.name!r} model={self.model!r}>"
