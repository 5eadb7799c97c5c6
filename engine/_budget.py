"""`Budget`: caps on calls, tokens and money, and the meter that enforces them.

The meter is checked before every attempt and charged after it, on every endpoint a
run uses, so a cap overshoots by at most the calls already in flight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._errors import BudgetExceededError, ConfigError
from ._types import Usage

__all__ = ["DEFAULT_PRICES", "Budget", "BudgetMeter", "Price"]


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million prompt and completion tokens.

    Prompt-cache tokens counted apart from the prompt (`Usage`'s cache fields) cost
    ``cache_write_per_million`` and ``cache_read_per_million``; by default as Anthropic
    prices them, 1.25x and 0.1x the input price.
    """

    input_per_million: float
    output_per_million: float
    cache_write_per_million: float | None = None
    cache_read_per_million: float | None = None

    def cost(self, usage: Usage) -> float:
        write = self.cache_write_per_million
        read = self.cache_read_per_million
        return (
            usage.prompt_tokens * self.input_per_million
            + usage.completion_tokens * self.output_per_million
            + usage.cache_creation_input_tokens
            * (write if write is not None else _CACHE_WRITE * self.input_per_million)
            + usage.cache_read_input_tokens
            * (read if read is not None else _CACHE_READ * self.input_per_million)
        ) / 1_000_000


# Anthropic's prompt-cache prices relative to input: a 5-minute cache write, a read.
_CACHE_WRITE = 1.25
_CACHE_READ = 0.1


# List prices (USD per 1M tokens) as published by OpenAI, Anthropic (prompt-cache writes
# 1.25x and reads 0.1x input, `Price`'s default) and Google (Gemini 2.x: cached input
# 0.25x, prompts up to 200k tokens); override with Budget(prices=).
_SONNET, _OPUS = Price(3.00, 15.00), Price(15.00, 75.00)
_HAIKU_45, _HAIKU_35 = Price(1.00, 5.00), Price(0.80, 4.00)
DEFAULT_PRICES: Mapping[str, Price] = MappingProxyType(
    {
        "gpt-4o": Price(2.50, 10.00),
        "gpt-4o-mini": Price(0.15, 0.60),
        "gpt-4.1": Price(2.00, 8.00),
        "gpt-4.1-mini": Price(0.40, 1.60),
        "gpt-4.1-nano": Price(0.10, 0.40),
        "o4-mini": Price(1.10, 4.40),
        "claude-sonnet-4-5": _SONNET,
        "claude-sonnet-4-5-20250929": _SONNET,
        "claude-sonnet-4-0": _SONNET,
        "claude-sonnet-4-20250514": _SONNET,
        "claude-3-7-sonnet-latest": _SONNET,
        "claude-opus-4-1": _OPUS,
        "claude-opus-4-1-20250805": _OPUS,
        "claude-opus-4-0": _OPUS,
        "claude-haiku-4-5": _HAIKU_45,
        "claude-haiku-4-5-20251001": _HAIKU_45,
        "claude-3-5-haiku-latest": _HAIKU_35,
        "claude-3-5-haiku-20241022": _HAIKU_35,
        "gemini-2.5-pro": Price(1.25, 10.00, cache_read_per_million=0.3125),
        "gemini-2.5-flash": Price(0.30, 2.50, cache_read_per_million=0.075),
        "gemini-2.5-flash-lite": Price(0.10, 0.40, cache_read_per_million=0.025),
        "gemini-2.0-flash": Price(0.10, 0.40, cache_read_per_million=0.025),
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Budget:
    """Optional caps for one run.

    Parameters:
        max_calls: provider requests, every attempt counted.
        max_tokens: prompt + completion tokens over all endpoints.
        max_cost: US dollars, priced with ``prices`` (merged over `DEFAULT_PRICES`);
            a model without a price is a `ConfigError` before the first call.
        prices: model name -> `Price`.
    """

    max_calls: int | None = None
    max_tokens: int | None = None
    max_cost: float | None = None
    prices: Mapping[str, Price] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_calls", "max_tokens"):
            value = getattr(self, name)
            # bool is an int to Python, never a count to a person: max_calls=True is a slip
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"Budget.{name} must be a positive int or None, got {value!r}")
        cost = self.max_cost
        if cost is not None and (
            isinstance(cost, bool)
            or not isinstance(cost, int | float)
            or not math.isfinite(cost)
            or not cost > 0
        ):
            raise ConfigError(f"Budget.max_cost must be a positive number of dollars, got {cost!r}")

    def price_table(self) -> dict[str, Price]:
        return {**DEFAULT_PRICES, **self.prices}


class BudgetMeter:
    """Counts calls, tokens and cost per model; raises when a cap is reached."""

    def __init__(self, budget: Budget | None, models: Iterable[str]) -> None:
        self.budget = budget or Budget()
        self._prices = self.budget.price_table()
        if self.budget.max_cost is not None:
            unknown = sorted({m for m in models if m not in self._prices})
            if unknown:
                raise ConfigError(
                    f"a money budget needs a price for model(s) {unknown}; pass "
                    "Budget(prices={name: Price(input_per_million, output_per_million)})"
                )
        self.calls: dict[str, int] = {}
        self.usage: dict[str, Usage] = {}
        self.exceeded: str | None = None
        # hedged requests (``RetryPolicy.hedge_after``), per model: duplicates sent, those
        # that answered first, and the tokens they are estimated to cost (in ``usage`` too)
        self.hedges: dict[str, int] = {}
        self.hedges_won: dict[str, int] = {}
        self.hedge_usage: dict[str, Usage] = {}

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_tokens(self) -> int:
        return sum(u.total_tokens for u in self.usage.values())

    @property
    def cost(self) -> float | None:
        """Estimated dollars, or ``None`` when some model has no known price."""
        return self._priced(self.usage)

    @property
    def hedge_cost(self) -> float | None:
        """Estimated dollars of the hedges, or ``None`` when some model has no price."""
        return self._priced(self.hedge_usage)

    def _priced(self, usage_by_model: dict[str, Usage]) -> float | None:
        total = 0.0
        for model, usage in usage_by_model.items():
            price = self._prices.get(model)
            if price is None:
                return None
            total += price.cost(usage)
        return total

    def check(self) -> None:
        """Raise `BudgetExceededError` once any cap is reached."""
        b = self.budget
        if self.exceeded is None:
            if b.max_calls is not None and self.total_calls >= b.max_calls:
                self.exceeded = f"call budget reached ({self.total_calls} >= {b.max_calls})"
            elif b.max_tokens is not None and self.total_tokens >= b.max_tokens:
                self.exceeded = f"token budget reached ({self.total_tokens} >= {b.max_tokens})"
            elif b.max_cost is not None and (self.cost or 0.0) >= b.max_cost:
                self.exceeded = f"money budget reached (${self.cost:.4f} >= ${b.max_cost})"
        if self.exceeded is not None:
            raise BudgetExceededError(self.exceeded)

    def charge_call(self, model: str) -> None:
        self.calls[model] = self.calls.get(model, 0) + 1

    def charge_usage(self, model: str, usage: Usage) -> None:
        self.usage[model] = self.usage.get(model, Usage()) + usage

    def charge_hedges(self, model: str, sent: int, won: int, usage: Usage | None) -> None:
        """Count ``sent`` duplicate requests of one call (``won`` of them answered first)
        and charge ``usage``, what they are estimated to cost: the request a duplicate
        cut short (or that cut the duplicate short) is billed by the provider all the
        same, and it is the same request as the answer's.  ``None``: no answer to go by."""
        self.count_hedges(model, sent, won, usage)
        if usage is not None:
            self.charge_usage(model, usage)

    def count_hedges(self, model: str, sent: int, won: int, usage: Usage | None) -> None:
        """Record hedges whose ``usage`` is charged already (a cluster worker's meter
        charged it, and its usage reaches this meter with the rest)."""
        self.hedges[model] = self.hedges.get(model, 0) + sent
        self.hedges_won[model] = self.hedges_won.get(model, 0) + won
        if usage is not None:
            self.hedge_usage[model] = self.hedge_usage.get(model, Usage()) + usage
