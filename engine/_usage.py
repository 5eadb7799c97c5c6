"""`Usage`: the token counts of one call (a leaf: errors and values both carry it)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Usage"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call.

    ``cache_creation_input_tokens`` and ``cache_read_input_tokens`` are prompt tokens
    written to and read from a provider's prompt cache where the provider counts them
    apart from ``prompt_tokens`` (Anthropic); they are priced apart (see `Price`).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        """Every prompt token the provider processed, cached or not."""
        return self.prompt_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cache_creation_input_tokens + other.cache_creation_input_tokens,
            self.cache_read_input_tokens + other.cache_read_input_tokens,
        )
