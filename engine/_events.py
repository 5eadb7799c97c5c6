"""Structured progress events: one log record and one optional callback per event.

Quiet as a library: the engine never configures logging and prints nothing on its own.
Each event goes

- to ``on_event`` when the caller passed one (the CLI's progress line, tests);
- to structlog's ``get_logger("engine")`` when the host has configured structlog;
- else to the standard library's ``logging.getLogger("engine")``, which has only a
  `logging.NullHandler` until the host configures logging (the convention of httpx
  and the standard library: silent until asked).

To see the events: configure structlog, or the standard library (its ``basicConfig``
with ``level=logging.INFO``)
(``DEBUG`` adds retries and progress).  Values are redacted before they leave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import structlog

from ._redact import redact_value

__all__ = ["Emitter", "Event", "EventCallback", "event_tap"]

_stdlib_logger = logging.getLogger("engine")
# A library adds a NullHandler and nothing else: without it, Python's "last resort"
# handler would print warnings to stderr in a host that never asked for them.
_stdlib_logger.addHandler(logging.NullHandler())
_STDLIB_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``name`` such as ``"evaluation.progress"`` and its data."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    time: float = 0.0


EventCallback = Callable[[Event], None]

# A listener the run's observability lends to every event emitted in its context (the
# OpenTelemetry spans and metrics of engine.tracing): set per run, never globally.
event_tap: ContextVar[EventCallback | None] = ContextVar("engine_event_tap", default=None)

_LEVELS = {"debug", "info", "warning", "error"}


class Emitter:
    """Sends events to an optional callback and to the host's logging, with context.

    ``logger`` (a structlog-style logger) forces where events are logged; by default
    it is decided per event (see the module docstring).
    """

    __slots__ = ("_callback", "_context", "_logger")

    def __init__(
        self, callback: EventCallback | None = None, *, logger: Any = None, **context: Any
    ) -> None:
        self._callback = callback
        self._logger = logger
        self._context = context

    def bind(self, **context: Any) -> Emitter:
        """A child emitter whose events carry ``context`` as well."""
        return Emitter(self._callback, logger=self._logger, **{**self._context, **context})

    def emit(self, name: str, level: str = "info", **data: Any) -> None:
        level = level if level in _LEVELS else "info"
        structured = self._logger is not None or structlog.is_configured()
        stdlib_on = not structured and _stdlib_logger.isEnabledFor(_STDLIB_LEVELS[level])
        tap = event_tap.get()
        if self._callback is None and tap is None and not structured and not stdlib_on:
            return  # nobody listens: do not even build the payload
        payload = redact_value({**self._context, **data})
        if self._callback is not None or tap is not None:
            event = Event(name, payload, time.monotonic())
            if self._callback is not None:
                self._callback(event)
            if tap is not None:
                tap(event)
        if structured:
            logger = self._logger if self._logger is not None else structlog.get_logger("engine")
            getattr(logger, level)(name, **payload)
        elif stdlib_on:
            fields = " ".join(f"{k}={v!r}" for k, v in payload.items())
            _stdlib_logger.log(_STDLIB_LEVELS[level], "%s %s", name, fields)
