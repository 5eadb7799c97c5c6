"""The one token rule the engine uses where a provider has not counted yet.

Four characters to a token, plus one: close enough for English text to size a token
bucket before a call (the provider's reported usage reconciles it afterwards), and
for simulated providers to bill something plausible.  Everything that estimates tokens
imports it from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["estimate_request_tokens", "estimate_text_tokens"]

# Chat formats add a few tokens of framing per message (role markers, separators).
_PER_MESSAGE_TOKENS = 4


def estimate_text_tokens(text: str) -> int:
    """Tokens in ``text`` by the 4-characters rule (at least 1)."""
    return len(text) // 4 + 1


def estimate_request_tokens(messages: Sequence[Mapping[str, str]], completion_tokens: int) -> int:
    """A request's prompt tokens (4-characters rule and message framing) plus the
    completion it is expected to produce: what a token bucket charges up front."""
    chars = sum(len(m.get("content", "")) for m in messages)
    return chars // 4 + _PER_MESSAGE_TOKENS * len(messages) + completion_tokens
