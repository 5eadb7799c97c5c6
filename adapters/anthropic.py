"""`AnthropicChat`: Claude through Anthropic's Messages API, natively.

The same lean path as `OpenAIChat` (one pooled aiohttp session, orjson), with the
Messages dialect (``adapters._anthropic_wire``): ``POST {base_url}/v1/messages`` with
``x-api-key`` and ``anthropic-version``; the prompt's system message goes to the
top-level ``system``; ``max_tokens``, required by the API, defaults to
``default_max_tokens`` (1024) when the prompt sets none.

What the engine gets from it, beyond the answer:

- the ``anthropic-ratelimit-*`` headers as a `RateLimitSnapshot` with input and output
  token limits apart, which the limiter learns as ``input_tpm`` / ``output_tpm``;
- a 429 with ``retry-after`` as `RateLimitedError` (the pause gate), the spend limit
  (``enforced_spend_limit_reached``) and 402 as `QuotaExceededError` (fatal, never
  retried), a 529 ``overloaded_error`` as a plain transient failure: Anthropic is busy,
  the account's limits are not lower, and nothing learned shrinks;
- ``stop_reason: refusal`` as `NoContentError` with the refusal's text;
- `Usage` with the prompt-cache fields (priced 1.25x and 0.1x input by `Price`).

Structured output: the Messages API has no ``response_format``; a requested one is not
sent (``response_format_sent`` says so, and cache keys follow) and the caller parses
the text defensively, as for an OpenAI endpoint that supports none.

Usage::

    async with AnthropicChat(limits=Limits(rpm=4000, input_tpm=2_000_000,
                                           output_tpm=400_000)) as claude:
        result = await evaluate(prompt, data, model=claude, metric=ExactMatch())
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine import Completion, ConfigError, Limits

from ._anthropic_wire import (
    API_VERSION,
    DEFAULT_MAX_TOKENS,
    encode_request,
    parse_response,
    translate_status,
)
from ._chat_base import ChatAdapter, pool_size
from ._http import AiohttpTransport
from ._native_route import Dialect, native_route

__all__ = ["ANTHROPIC", "AnthropicChat"]

ANTHROPIC = Dialect(
    kind="anthropic-messages",
    default_base_url="https://api.anthropic.com",
    base_url_env="ANTHROPIC_BASE_URL",
    api_key_env="ANTHROPIC_API_KEY",
    key_header="x-api-key",
)


class AnthropicChat(ChatAdapter):
    """A Claude model behind the Messages API; implements `engine.ChatModel`.

    Parameters:
        base_url: the API root, without ``/v1`` (``https://api.anthropic.com``, the
            default, or ``$ANTHROPIC_BASE_URL``).  Must not carry credentials.
        api_key: the key; default ``$ANTHROPIC_API_KEY``.  A custom ``base_url`` may go
            without one (a simulated or proxy server).
        limits: the endpoint's `Limits` (``input_tpm`` / ``output_tpm`` for ITPM and
            OTPM); its concurrency also sizes the connection pool (default 32).
        timeout: seconds for one HTTP request.
        name: label for events and errors; default host and path of the root.
        default_max_tokens: ``max_tokens`` sent when the prompt sets none (1024); also
            what the engine reserves against an output-token limit.
        anthropic_version: the ``anthropic-version`` header (``2023-06-01``).
        headers: extra headers on every request (``anthropic-beta``, gateways); they
            override the adapter's own by name.
        query: extra query parameters on every request (gateways).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        timeout: float = 120.0,
        name: str | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        anthropic_version: str = API_VERSION,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> None:
        self._keep_arguments(
            base_url=base_url,
            api_key=api_key,
            limits=limits,
            timeout=timeout,
            name=name,
            default_max_tokens=default_max_tokens,
            anthropic_version=anthropic_version,
            headers=headers,
            query=query,
        )
        if not isinstance(default_max_tokens, int) or default_max_tokens < 1:
            raise ConfigError(
                f"default_max_tokens must be a positive int, got {default_max_tokens!r}"
            )
        route = native_route(
            ANTHROPIC,
            base_url=base_url,
            path="/v1/messages",
            api_key=api_key,
            extra_headers={"anthropic-version": anthropic_version},
            headers=headers,
            query=query,
        )
        self._take_identity(route.identity, route.secrets, name=name or route.label, limits=limits)
        self.default_max_tokens = default_max_tokens
        self._transport = AiohttpTransport(
            route, pool=pool_size(limits), timeout=timeout, endpoint=self.name
        )

    def response_format_sent(self, requested: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """Always ``None``: the Messages API takes no ``response_format``."""
        return None

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._transport.aclose()

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        body = encode_request(messages, params, default_max_tokens=self.default_max_tokens)
        raw = await self._transport.send(body)
        return self._read_answer(raw, parse_response, translate_status)

    def __repr__(self) -> str:
        return f"<AnthropicChat {self.name!r}>"
