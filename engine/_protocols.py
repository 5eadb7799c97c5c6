"""The small protocols the engine owns; adapters implement them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ._types import Completion, Example, MetricResult

__all__ = ["CacheStore", "ChatModel", "Metric", "MetricReturn"]


@runtime_checkable
class ChatModel(Protocol):
    """A chat-completion endpoint.

    ``complete`` sends one request and raises only `ProviderError` subclasses for
    provider failures; it must not retry on its own (the engine's retry policy and
    limiter need to see every attempt).  ``params`` carries the prompt's model,
    sampling parameters and ``response_format``.

    Optional attributes the engine looks up with ``getattr`` (all have defaults):

    - ``name: str``: a label for events and errors.
    - ``limits: Limits``: picked up by `Endpoint` when none are given.
    - ``cache_identity: str``: who answers (adapter and base URL, never a key); part of
      every prediction's cache key, so two servers serving the same model name do not
      share answers.  Default: the class's qualified name.
    - ``response_format_sent(requested) -> Mapping | None``: the response format this
      endpoint would actually send for ``requested`` right now (an adapter that fell
      back from ``json_schema`` to ``json_object`` or text says so); part of the key.
    - ``default_max_tokens: int``: the ``max_tokens`` the adapter sends when the prompt
      sets none (Anthropic requires one); what `Endpoint` reserves against an
      ``output_tpm`` limit for such a prompt.
    """

    async def complete(
        self, messages: Sequence[Mapping[str, str]], /, **params: Any
    ) -> Completion: ...


MetricReturn = MetricResult | float | bool
"""What a metric may return: a `MetricResult`, or a bare score in [0, 1]."""

Metric = Callable[[Example, str], MetricReturn | Awaitable[MetricReturn]]
"""A per-example metric: ``(example, prediction_text) -> MetricResult``, sync or async."""


@runtime_checkable
class CacheStore(Protocol):
    """A key-value store of JSON text.  Keys and values are ``str``; never pickle."""

    async def get(self, key: str) -> str | None: ...

    async def put(self, key: str, value: str) -> None: ...

    async def aclose(self) -> None: ...
