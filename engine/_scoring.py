"""Calling a metric: inline, in a worker thread, or awaited; always with a deadline.

A metric is ``(example, prediction) -> MetricResult | number``, sync or async.  How it
runs is decided by the metric, not guessed:

- ``inline = True`` (the built-in metrics set it): called on the event loop.  For
  microsecond metrics a thread hop costs more than the metric.
- any other synchronous metric runs in a worker thread (a capacity limiter of its own
  bounds how many), so a slow one never blocks the loop, the limiter or the timeouts.
- an async metric is awaited.

Every call has a timeout (``metric_timeout``); a metric that never returns becomes a
`MetricError` outcome for that example instead of hanging the run, and so does one that
returns after its timeout on the loop clock (an async metric blocking the loop).
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import anyio

from ._errors import MetricError, MetricTimeoutError
from ._prompt import render_value
from ._protocols import Metric, MetricReturn
from ._types import Example, MetricResult, as_score

__all__ = ["MetricRunner", "as_result", "check_metric", "is_async_metric"]


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
        threads: worker threads for a synchronous metric that is not ``inline``.
    """

    __slots__ = ("inline", "is_async", "metric", "threads", "timeout")

    def __init__(self, metric: Metric, *, timeout: float | None = 60.0, threads: int = 16) -> None:
        if timeout is not None and not timeout > 0:
            raise MetricError(f"metric_timeout must be positive or None, got {timeout!r}")
        if threads < 1:
            raise MetricError(f"metric_threads must be at least 1, got {threads!r}")
        self.metric = metric
        self.timeout = timeout
        self.is_async = is_async_metric(metric)
        self.inline = not self.is_async and getattr(metric, "inline", False) is True
        threaded = not (self.is_async or self.inline)
        self.threads = anyio.CapacityLimiter(threads) if threaded else None

    @property
    def waits(self) -> bool:
        """Whether a call may wait (async or threaded) rather than return at once."""
        return not self.inline

    async def __call__(self, example: Example, prediction: str) -> MetricResult:
        where = f"metric on example {example.id!r}"
        if self.inline:
            return as_result(self.metric(example, prediction), where)
        started = anyio.current_time()
        with anyio.move_on_after(self.timeout) as scope:
            if self.threads is not None:
                value = await anyio.to_thread.run_sync(
                    self.metric, example, prediction, limiter=self.threads, abandon_on_cancel=True
                )
            else:
                value = self.metric(example, prediction)
                if inspect.isawaitable(value):
                    value = await value
        # An async metric that blocks the loop (no await) cannot be interrupted; past
        # its timeout on the loop clock when it returns, its result is not accepted.
        late = self.timeout is not None and anyio.current_time() - started > self.timeout
        if scope.cancelled_caught or late:
            raise MetricTimeoutError(f"{where}: no result within {self.timeout:g}s")
        return as_result(value, where)


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
