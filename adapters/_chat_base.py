"""What every chat adapter does the same way, whatever its wire.

`OpenAIChat`, `AnthropicChat`, `GeminiChat` and `LiteLLMChat` keep their constructor
arguments (a cluster worker rebuilds the adapter from them: no live connection crosses
processes), register the secrets they hold for redaction, and answer for cache keys
with an identity that names who answers, never a key.  `ChatAdapter` holds that once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from engine import AsyncCloseable, Completion, ConfigError, Limits, ProviderError, register_secret

from ._wire import RawResponse

__all__ = ["DEFAULT_POOL", "ChatAdapter", "pool_size"]

DEFAULT_POOL = 32  # = Limits().concurrency, the engine's default


def pool_size(limits: Limits | None) -> int:
    """Connections to pool for ``limits``: its concurrency, or the engine's default."""
    return limits.concurrency if limits is not None else DEFAULT_POOL


def _rebuild(kind: type[ChatAdapter], arguments: Mapping[str, Any]) -> ChatAdapter:
    return kind(**arguments)


class ChatAdapter(AsyncCloseable):
    """The bookkeeping a chat adapter shares with the others (see the module)."""

    limits: Limits | None
    name: str
    _arguments: dict[str, Any]
    _identity: str
    _secrets: tuple[str, ...]

    def _keep_arguments(self, **arguments: Any) -> None:
        """Check ``timeout`` and keep the constructor's ``arguments`` for pickling
        (mappings copied, so a caller's later change does not travel)."""
        timeout = arguments["timeout"]
        if not timeout > 0:
            raise ConfigError(f"timeout must be positive, got {timeout!r}")
        self._arguments = {
            k: dict(v) if isinstance(v, Mapping) else v for k, v in arguments.items()
        }

    def _take_identity(
        self, identity: str, secrets: tuple[str, ...], *, name: str, limits: Limits | None
    ) -> None:
        """Answer as ``name`` under ``identity``; ``secrets`` are redacted by value
        wherever the engine writes text."""
        for secret in secrets:
            register_secret(secret)
        self.limits = limits
        self.name = name
        self._identity = identity
        self._secrets = secrets

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its constructor arguments: a cluster worker opens its own pool."""
        return (_rebuild, (type(self), self._arguments))

    @property
    def cache_identity(self) -> str:
        """Who answers, for cache keys: the adapter kind and the root URL (for Azure
        the deployment and api-version too).  Never a key or a header."""
        return self._identity

    def _read_answer(
        self,
        raw: RawResponse,
        parse: Callable[..., Completion],
        translate: Callable[..., ProviderError],
    ) -> Completion:
        """The answer in ``raw`` read by the wire's ``parse``, or the wire's error
        (``translate``) for a status that is not 2xx."""
        if 200 <= raw.status < 300:
            return parse(raw, endpoint=self.name)
        raise translate(
            raw.status, raw.headers, raw.body, endpoint=self.name, secrets=self._secrets
        )
