"""Structured progress events: one structlog event and one optional callback per event.

The engine never configures logging.  It logs through ``structlog.get_logger("engine")``
(the host's configuration applies) and hands the same `Event` to ``on_event``.  Values
are redacted before they leave, whatever processors the host installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from ._redact import redact_value

__all__ = ["Emitter", "Event", "EventCallback"]


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``name`` such as ``"evaluation.progress"`` and its data."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0


EventCallback = Callable[[Event], None]

_LEVELS = {"debug", "info", "warning", "error"}


class Emitter:
    """Sends events to structlog and to an optional callback, with bound context."""

    __slots__ = ("_callback", "_context", "_logger")

    def __init__(
        self, callback: EventCallback | None = None, *, logger: Any = None, **context: Any
    ) -> None:
        self._callback = callback
        self._logger = logger if logger is not None else structlog.get_logger("engine")
        self._context = context

    def bind(self, **context: Any) -> Emitter:
        """A child emitter whose events carry ``context`` as well."""
        return Emitter(self._callback, logger=self._logger, **{**self._context, **context})

    def emit(self, name: str, level: str = "info", **data: Any) -> None:
        payload = redact_value({**self._context, **data})
        if self._callback is not None:
            self._callback(Event(name, payload, time.monotonic()))
        log = getattr(self._logger, level if level in _LEVELS else "info")
        log(name, **payload)
