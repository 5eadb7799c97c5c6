"""What a run lends to every call made on its behalf: its budget meter and its events.

An evaluation sets these for the tasks it starts (anyio copies the context into each
child task), so a call made deep inside a user's metric (an `LLMJudge` on its own
endpoint) is charged to the run's budget and reported with the run's events, without
the metric having to know about either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ._budget import BudgetMeter
from ._events import Emitter

__all__ = ["current_emitter", "current_meter", "lend"]

current_meter: ContextVar[BudgetMeter | None] = ContextVar("engine_meter", default=None)
current_emitter: ContextVar[Emitter | None] = ContextVar("engine_emitter", default=None)


@contextmanager
def lend(meter: BudgetMeter | None, emitter: Emitter | None) -> Iterator[None]:
    """Make ``meter`` and ``emitter`` the defaults of calls started inside the block."""
    meter_token = current_meter.set(meter)
    emitter_token = current_emitter.set(emitter)
    try:
        yield
    finally:
        current_emitter.reset(emitter_token)
        current_meter.reset(meter_token)
