"""Test doubles for code that calls the engine, as httpx ships ``MockTransport``.

- `ScriptedModel`: a chat model around a handler function, with injected latency and
  faults (`transient_faults` or any `FaultPlan`), that logs what the provider saw.
- `FakeClock`: a clock that moves only when told, for limiter and breaker arithmetic.
- `EventRecorder`, `capture_logs`: what the engine reported.

Usage::

    from engine.testing import ScriptedModel, transient_faults
    model = ScriptedModel(lambda request: "42", faults=transient_faults(0.1))
    result = await evaluate(prompt, data, model=model, metric=ExactMatch())
    assert model.calls == len(data) + result.retries
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog.testing

from ._events import Event
from ._scripted import FaultPlan, ScriptedModel, ScriptedRequest, transient_faults

__all__ = [
    "EventRecorder",
    "FakeClock",
    "FaultPlan",
    "ScriptedModel",
    "ScriptedRequest",
    "capture_logs",
    "transient_faults",
]


class FakeClock:
    """A clock that moves only when told: pass it as ``RateLimiter(clock=...)``.

    Usage::

        clock = FakeClock()
        limiter = RateLimiter(Limits(), clock=clock)
        limiter.pause(2.0)
        clock.advance(1.5)
        assert limiter.paused_for() == 0.5
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now += seconds


class EventRecorder:
    """An ``on_event`` callback that keeps every event; ``names()`` lists them in order."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [e.name for e in self.events]

    def named(self, name: str) -> list[Event]:
        return [e for e in self.events if e.name == name]


@contextmanager
def capture_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's ``capture_logs``: every engine log event as a dict, nothing printed."""
    with structlog.testing.capture_logs() as logs:
        yield logs
