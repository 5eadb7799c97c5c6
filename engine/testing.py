"""Helpers for testing code that calls the engine: event capture and log capture.

A scripted chat model for tests lives in ``adapters.scripted`` (adapters implement the
engine's protocols; the engine never imports them).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog.testing

from ._events import Event

__all__ = ["EventRecorder", "capture_logs"]


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
