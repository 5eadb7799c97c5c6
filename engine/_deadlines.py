"""One deadline watcher for every suspended async metric call of a run (asyncio).

A cancel scope per metric call costs a timer and the scope's bookkeeping on every
example.  Every call of one metric has the same timeout, so their deadlines come in the
order the calls started: one queue and one loop timer, set for the oldest call still
running, watch them all.  A call past its deadline has the future it is waiting on
cancelled, as ``Task.cancel`` would, and the driver resuming the metric's coroutine
(`drive`) throws `MetricDeadlineExpired` into the metric in place of that cancellation:
the metric's ``finally`` blocks and its own cancel scopes unwind as for any exception,
and the task itself is never marked cancelled (an evaluation's cancellation stays
distinguishable from a metric's timeout).

The coroutine was started before the watcher knew of it (most metrics answer without
suspending and never get this far), so no cancel scope may be entered around its rest:
one of its own scopes may already be open, and scopes must close in the order they
opened.  That is why the deadline is not a scope.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["DeadlineWatcher", "MetricDeadlineExpired", "Pending", "drive"]


class MetricDeadlineExpired(Exception):
    """Thrown into an async metric's coroutine at its await point past its deadline."""


class Pending:
    """One suspended metric call under watch."""

    __slots__ = ("deadline", "done", "expired", "thrown", "waiting")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.done = False
        self.expired = False  # past its deadline: the driver throws at the next resume
        self.thrown = False  # the deadline was thrown into the metric (once)
        self.waiting: Any = None  # what the coroutine awaits right now (a future)


class DeadlineWatcher:
    """The deadlines of one metric's suspended calls: one queue, one loop timer."""

    __slots__ = ("_handle", "_live", "_queue")

    def __init__(self) -> None:
        self._queue: deque[Pending] = deque()
        self._handle: asyncio.TimerHandle | None = None
        self._live = 0  # watched and not done (the queue may hold done ones too)

    def watch(self, loop: asyncio.AbstractEventLoop, deadline: float) -> Pending:
        """Watch a call that must be done by ``deadline`` (loop time)."""
        pending = Pending(deadline)
        queue = self._queue
        queue.append(pending)
        self._live += 1
        if len(queue) > 2 * self._live + 64:  # done calls behind a slow one: drop them
            self._queue = deque(p for p in queue if not p.done)
        if self._handle is None:
            self._handle = loop.call_at(deadline, self._fire, loop)
        return pending

    def done(self, pending: Pending) -> None:
        pending.done = True
        self._live -= 1

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        now = loop.time()
        queue = self._queue
        while queue and (queue[0].done or queue[0].deadline <= now):
            pending = queue.popleft()
            if pending.done:
                continue
            pending.expired = True
            waiting = pending.waiting
            if isinstance(waiting, asyncio.Future):
                waiting.cancel()  # wakes the task; the driver turns it into the deadline
        if queue:
            self._handle = loop.call_at(queue[0].deadline, self._fire, loop)


def _ours(exc: BaseException) -> bool:
    """Whether ``exc`` is the cancellation of a future the watcher cancelled, not of
    the task (nobody called ``cancel()`` on the task)."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() == 0


@types.coroutine
def drive(
    coro: Coroutine[Any, Any, Any], yielded: Any, pending: Pending
) -> Generator[Any, Any, Any]:
    """Await the rest of ``coro``, already started with ``send(None)`` that yielded
    ``yielded``: hand each yield to the event loop and each answer (or exception) back,
    as ``await`` would have from the start; past the deadline, throw it in once."""
    while True:
        pending.waiting = yielded
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # the awaited future's error or a cancellation
            error: BaseException = exc
            if pending.expired and not pending.thrown and _ours(exc):
                pending.thrown = True
                error = MetricDeadlineExpired()
            try:
                yielded = coro.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                if pending.expired and not pending.thrown:
                    pending.thrown = True  # it was waiting on nothing cancellable
                    yielded = coro.throw(MetricDeadlineExpired())
                else:
                    yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value
