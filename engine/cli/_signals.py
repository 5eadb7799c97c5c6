"""SIGTERM ends a run the way Ctrl-C does, whatever the process inherited for SIGINT.

``docker stop``, systemd and ``timeout`` send SIGTERM, whose default action kills the
process like ``kill -9`` (answers still in the cache writer's queue are lost, paid calls
in flight are paid twice on resume).  The CLI instead cancels the run's task: every call
in flight is cancelled, the cache flushed, "interrupted" printed, exit 130.

It does not go through SIGINT: a process started as a background job of a shell script
inherits SIGINT *ignored*, so asyncio installs no Ctrl-C handler there and a SIGINT
raised on SIGTERM would do nothing (the run went on to the end and exited 0).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Termination"]


class Termination:
    """Watches for SIGTERM while a run's event loop is running.

    ``watching()`` (entered inside the run's main task) cancels that task on SIGTERM and
    sets `received`; the caller turns the resulting cancellation into the interrupted
    exit.  Outside the main thread, or on a loop without signal handlers, it does nothing.
    """

    __slots__ = ("received",)

    def __init__(self) -> None:
        self.received = False

    def _on_term(self, task: asyncio.Task[object] | None) -> None:
        self.received = True
        if task is not None:
            task.cancel()

    @contextmanager
    def watching(self) -> Iterator[None]:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGTERM, self._on_term, task)
        except (ValueError, RuntimeError, NotImplementedError):
            yield  # not the main thread (main() called from a test), or no such support
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
