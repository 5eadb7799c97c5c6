"""Calling a metric: inline, in a worker thread, or awaited; always with a deadline.

A metric is ``(example, prediction) -> MetricResult | number``, sync or async.  How it
runs:

- ``inline = True`` (the built-in metrics set it): always called on the event loop.
- ``inline = False``: always in a worker thread (a capacity limiter of its own bounds
  how many), so a slow one never blocks the loop, the limiter or the timeouts.
- a synchronous metric that says neither is *inline until it proves slow*: it runs on
  the loop, every call timed (two reads of the clock, about 0.1 us), and the second
  call in a row that takes longer than `SLOW_CALL` (1 ms) moves it to the thread pool
  for the rest of the run, announced once (the ``metric.threaded`` event).  One slow
  call alone is not enough: the loop's thread may have waited for the GIL or the OS.
  A thread hop costs about 0.1-0.3 ms of client CPU, more than most metrics; a metric
  slower than 1 ms would hold every other example's I/O back for longer than that.
  The second slow call is also timed on the thread's CPU clock: a metric that spent
  at least half of it computing (`CPU_BOUND`) is CPU-bound, and runs in at most
  one thread per core plus one (never more than ``threads``): more threads only take
  turns at the GIL, and with many of them the event loop's thread waits its turn
  behind each (measured on a cluster worker sharing its core: 16 threads 14.4-14.7 s,
  3 threads 12.8 s for the same work).  A metric that waits (on a judge, a file)
  keeps every thread it is given.
- an async metric is driven on the loop: one that returns without ever suspending (a
  comparison written as ``async def``) costs no task, timer or cancel scope; one that
  suspends (it awaits a judge, a sleep) continues under its deadline, watched by one
  timer for all the metric's calls in flight (`engine._deadlines`), not a scope each.

Every call has a timeout (``metric_timeout``); a metric that never returns becomes a
`MetricError` outcome for that example instead of hanging the run, and so does one that
returns after its timeout (a metric blocking the loop cannot be interrupted, but its
late result is not accepted).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import os
import time
from collections.abc import Coroutine
from typing import Any

import anyio

from ._clock import loop_time
from ._context import current_emitter
from ._deadlines import DeadlineWatcher, Pending, drive
from ._errors import MetricError, MetricTimeoutError
from ._prompt import render_value
from ._protocols import Metric, MetricReturn
from ._types import Example, MetricResult, as_score

__all__ = [
    "CPU_BOUND",
    "SLOW_CALL",
    "MetricRunner",
    "as_result",
    "check_metric",
    "is_async_metric",
]

_NOT_CALLED: Any = object()

SLOW_CALL = 0.001
"""Seconds: a synchronous metric with no ``inline`` attribute whose calls take longer
than this twice in a row moves from the event loop to the thread pool."""

CPU_BOUND = 0.5
"""The share of a slow call's time spent on the CPU from which a metric is CPU-bound
(then it runs in at most `cpu_threads()` threads)."""


def cpu_threads() -> int:
    """Threads a CPU-bound metric may use: one per core this process may run on, plus
    one ready to take the GIL when a call ends."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores + 1


def is_async_metric(metric: Metric) -> bool:
    call = getattr(metric, "__call__", None)  # noqa: B004 - callable instances
    target = metric.func if isinstance(metric, functools.partial) else metric
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(call)


def as_result(value: MetricReturn | Any, where: str) -> MetricResult:
    """A metric's return value as a `MetricResult`: any plain number, NumPy scalars
    included (see `as_score`); anything else is a `MetricError`."""
    if isinstance(value, MetricResult):
        return value
    score = as_score(value)  # numpy.bool_ is not a bool, numpy.int64 not an int
    if score is not None:
        try:
            return MetricResult(score)
        except MetricError as exc:
            raise MetricError(f"{where}: {exc}") from None
    raise MetricError(
        f"{where}: a metric must return a MetricResult or a number in [0, 1], "
        f"got {type(value).__name__}"
    )


class MetricRunner:
    """Runs one metric the way it asks to be run (see the module docstring).

    Parameters:
        metric: the per-example metric.
        timeout: seconds one call may take (``None``: unbounded).
        threads: worker threads for a synchronous metric that is not ``inline`` (one
            measured CPU-bound uses at most `cpu_threads()` of them).
    """

    __slots__ = (
        "adaptive",
        "announced",
        "cpu_bound",
        "inline",
        "is_async",
        "metric",
        "slow_calls",
        "suspends",
        "threads",
        "timeout",
        "watcher",
    )

    def __init__(self, metric: Metric, *, timeout: float | None = 60.0, threads: int = 16) -> None:
        if timeout is not None and not timeout > 0:
            raise MetricError(f"metric_timeout must be positive or None, got {timeout!r}")
        if threads < 1:
            raise MetricError(f"metric_threads must be at least 1, got {threads!r}")
        self.metric = metric
        self.timeout = timeout
        self.is_async = is_async_metric(metric)
        asked = getattr(metric, "inline", None)
        # no inline attribute: on the loop until a call proves slow (see `SLOW_CALL`)
        self.adaptive = not self.is_async and not isinstance(asked, bool)
        self.inline = not self.is_async and asked is not False
        self.announced = False
        self.cpu_bound = False  # measured so when it moved to threads
        self.slow_calls = 0  # calls over `SLOW_CALL` in a row, while inline
        # an async metric: None until a call is seen, then whether any call suspended
        self.suspends: bool | None = None
        self.watcher = DeadlineWatcher()  # the deadlines of its suspended calls
        threaded = not self.is_async and asked is not True
        self.threads = anyio.CapacityLimiter(threads) if threaded else None

    @property
    def waits(self) -> bool:
        """Whether a call may wait (async or threaded) rather than return at once, as
        the run starts: an adaptive metric starts inline, and an async metric whose
        calls so far (the check before the first call) answered without suspending is
        taken at its word."""
        if self.is_async:
            return self.suspends is not False
        return not self.inline

    async def __call__(self, example: Example, prediction: str) -> MetricResult:
        if self.inline:
            if not self.adaptive:
                return _result(self.metric(example, prediction), example)
            return self._timed(example, prediction)
        if self.threads is not None:
            return await self._threaded(example, prediction, self.threads)
        return await self._awaited(example, prediction)

    def _timed(self, example: Example, prediction: str) -> MetricResult:
        """An adaptive metric's call on the loop, timed; past `SLOW_CALL` the metric
        moves to the thread pool (the next call goes there)."""
        suspect = self.slow_calls >= 1  # the call before was slow: time this one's CPU
        cpu = time.thread_time() if suspect else 0.0
        started = time.perf_counter()
        value = self.metric(example, prediction)
        took = time.perf_counter() - started
        if took > SLOW_CALL:
            # Two slow calls in a row: one alone may be the loop's thread waiting for
            # the GIL (another thread's switch interval is 5 ms) or the OS, not the metric.
            if suspect:
                self.inline = False
                if time.thread_time() - cpu >= CPU_BOUND * took:
                    self._cap_threads()
                self._announce(took)
            self.slow_calls += 1
            if self.timeout is not None and took > self.timeout:
                raise MetricTimeoutError(f"{_where(example)}: no result within {self.timeout:g}s")
        elif self.slow_calls:
            self.slow_calls = 0
        return _result(value, example)

    def _cap_threads(self) -> None:
        """A CPU-bound metric: no more threads than can run (see the module docstring)."""
        if self.threads is not None:
            self.threads.total_tokens = min(int(self.threads.total_tokens), cpu_threads())
            self.cpu_bound = True

    def _announce(self, took: float) -> None:
        """Say once that the metric now runs in threads; the run's events may not be
        lent yet (the check before the first call), then the next call says it."""
        if self.announced:
            return
        events = current_emitter.get()
        if events is None:
            return
        self.announced = True
        events.emit(
            "metric.threaded",
            metric=getattr(self.metric, "__qualname__", type(self.metric).__qualname__),
            call_ms=round(took * 1000, 3),
            threshold_ms=SLOW_CALL * 1000,
            threads=int(self.threads.total_tokens) if self.threads is not None else 0,
            cpu_bound=self.cpu_bound,
            hint="set metric.inline = False to start in threads, True to stay on the loop",
        )

    async def _threaded(
        self, example: Example, prediction: str, threads: anyio.CapacityLimiter
    ) -> MetricResult:
        if self.adaptive and not self.announced:
            self._announce(SLOW_CALL)
        started = loop_time()
        with anyio.CancelScope(deadline=_deadline(started, self.timeout)) as scope:
            value = await anyio.to_thread.run_sync(
                self.metric, example, prediction, limiter=threads, abandon_on_cancel=True
            )
        self._check_late(example, started, scope)
        return _result(value, example)

    async def _awaited(self, example: Example, prediction: str) -> MetricResult:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio (trio): a cancel scope per call
            return await self._scoped(example, prediction)
        started = loop.time()
        value: Any = self.metric(example, prediction)
        if inspect.iscoroutine(value):
            try:
                yielded = value.send(None)  # most metrics answer without suspending
            except StopIteration as done:
                value = done.value
                if self.suspends is None:
                    self.suspends = False
            else:
                self.suspends = True
                value = await self._watched(loop, started, example, value, yielded)
        elif inspect.isawaitable(value):
            return await self._scoped(example, prediction, value)
        self._check_late(example, started, None)
        return _result(value, example)

    async def _watched(
        self,
        loop: asyncio.AbstractEventLoop,
        started: float,
        example: Example,
        coro: Coroutine[Any, Any, Any],
        yielded: Any,
    ) -> Any:
        """The rest of a suspended metric call, under the run's one deadline watcher."""
        timeout = self.timeout
        if timeout is None:
            return await drive(coro, yielded, Pending(math.inf))
        pending = self.watcher.watch(loop, started + timeout)
        try:
            return await drive(coro, yielded, pending)
        except Exception as exc:
            if pending.thrown:  # the deadline, or what the metric made of it
                raise MetricTimeoutError(
                    f"{_where(example)}: no result within {timeout:g}s"
                ) from exc
            raise
        finally:
            self.watcher.done(pending)

    async def _scoped(
        self, example: Example, prediction: str, value: Any = _NOT_CALLED
    ) -> MetricResult:
        """An async metric under a cancel scope of its own, entered before the call."""
        started = loop_time()
        with anyio.CancelScope(deadline=_deadline(started, self.timeout)) as scope:
            if value is _NOT_CALLED:
                value = self.metric(example, prediction)
            if inspect.isawaitable(value):
                value = await value
        self._check_late(example, started, scope)
        return _result(value, example)

    def _check_late(
        self, example: Example, started: float, scope: anyio.CancelScope | None
    ) -> None:
        # A metric that blocks the loop (no await) cannot be interrupted; past its
        # timeout on the loop clock when it returns, its result is not accepted.
        timeout = self.timeout
        if timeout is None:
            return
        if (scope is not None and scope.cancelled_caught) or loop_time() - started > timeout:
            raise MetricTimeoutError(f"{_where(example)}: no result within {timeout:g}s")


def _result(value: Any, example: Example) -> MetricResult:
    """`as_result`, naming the example only when it is needed (once per call counts)."""
    if type(value) is MetricResult:
        return value
    return as_result(value, _where(example))


def _where(example: Example) -> str:
    return f"metric on example {example.id!r}"


def _deadline(started: float, timeout: float | None) -> float:
    return started + timeout if timeout is not None else float("inf")


async def check_metric(metric: Metric | MetricRunner, example: Example) -> None:
    """Run the metric once on the expected answer, so a broken metric fails before
    anything is paid.  Metrics that cost calls opt out with ``preflight = False``."""
    runner = metric if isinstance(metric, MetricRunner) else MetricRunner(metric)
    if getattr(runner.metric, "preflight", True) is False:
        return
    prediction = "" if example.expected is None else render_value(example.expected)
    try:
        await runner(example, prediction)
    except MetricError as exc:
        raise MetricError(f"metric check before the first call failed: {exc}") from exc
    except Exception as exc:
        raise MetricError(
            f"metric raised {type(exc).__name__} on example {example.id!r} with its expected "
            f"answer as the prediction (checked before the first call): {exc}"
        ) from exc
