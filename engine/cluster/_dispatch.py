"""Feeding batches to the worker pool: in order, a few at a time, surviving deaths.

Each worker slot has ``depth`` feeder tasks (so a worker always has its next batch
while it finishes one).  A feeder takes the next batch of the source, sends it to its
slot's worker and hands the result to ``deliver``; the results of a pass may arrive in
any order, and ``deliver`` puts them back in dataset order.  The source is read no
further than ``window`` batches past the oldest one not yet delivered, so the driver
holds a bounded number of batches whatever the dataset's size.

A worker that dies (its actor killed, its process SIGKILLed, its node lost) fails
every batch it was running with `ActorDied`; the feeder has the slot's worker
replaced (once, however many of its batches saw the death), lets ``rerun`` undo what
the dead run reported (racing's tally) and sends the same batch to the new process.
Nothing of a dead batch was delivered, so nothing is counted twice; with a shared
cache, what it had paid for is served, not paid again.

Any other failure stops the pass: every batch in flight is cancelled (``ray.cancel``,
which cancels its calls in the worker) and the failure is re-raised as itself.  A
source not read to its end is closed before the pass returns, while Ray is up: Ray
Data's iterator, left to the garbage collector, shuts its executor down from a
finalizer, and after the cluster has shut Ray down that starts a new local Ray and
hangs the process's exit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Generic, TypeVar

import anyio

from .._events import Emitter
from ._ray import ActorDied, ray_module, unwrap_task_error

__all__ = ["Feeder"]

_CLOSE_TIMEOUT = 30.0  # seconds a stopped source gets to close (a read in progress first)

B = TypeVar("B")
R = TypeVar("R")


class Feeder(Generic[B, R]):
    """One pass of batches over the pool.

    Parameters:
        pool: the cluster's pool (``handle(slot)``, ``replace(slot, handle)``).
        slots: the worker slots this pass uses.
        source: the batches, in order (``seq`` 0, 1, ...); may block (read in a thread).
        call: ``(worker handle, batch) -> ObjectRef`` of the remote call.
        deliver: takes each result; returns True to stop the pass (racing).
        prepare: turns a batch into what is sent (e.g. seeds its cache rows).
        before_send: raises to stop the pass before one more batch goes out (budget).
        rerun: before a batch whose worker died is sent again (forget its dead run).
    """

    def __init__(
        self,
        pool: Any,
        slots: list[int],
        source: Iterator[B],
        call: Callable[[Any, B], Any],
        deliver: Callable[[B, R], Awaitable[bool]],
        *,
        events: Emitter,
        depth: int = 2,
        window: int | None = None,
        prepare: Callable[[B], Awaitable[B]] | None = None,
        before_send: Callable[[], None] | None = None,
        rerun: Callable[[B], Awaitable[None]] | None = None,
    ) -> None:
        self.pool = pool
        self.slots = slots
        self.source = source
        self.call = call
        self.deliver = deliver
        self.events = events
        self.depth = depth
        self.window = window if window is not None else 4 * depth * len(slots)
        self.prepare = prepare
        self.before_send = before_send
        self.rerun = rerun
        self.taken = 0  # batches read from the source
        self.delivered: set[int] = set()  # sequence numbers delivered, not yet contiguous
        self.oldest = 0  # every batch before this one is delivered
        self.stopped = False
        self.exhausted = False
        self.failure: BaseException | None = None
        self.inflight: set[Any] = set()
        self.running = {slot: 0 for slot in slots}  # examples sent to each slot, not back
        self.moved = anyio.Event()  # set (and replaced) whenever ``oldest`` moves
        self.reading = anyio.Lock()

    async def run(self) -> None:
        """Feed every batch; return when all are delivered or the pass was stopped."""
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.depth):  # round robin: the first batches spread out
                    for slot in self.slots:
                        tg.start_soon(self._feed, slot, tg.cancel_scope)
        finally:
            self._cancel_inflight()
            await self._close_source()
        if self.failure is not None:
            raise self.failure

    async def _close_source(self) -> None:
        """Close a source stopped before its end (see the module's docstring)."""
        close = getattr(self.source, "close", None)
        if close is None or self.exhausted:
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_TIMEOUT):
            await anyio.to_thread.run_sync(_close_when_idle, close, abandon_on_cancel=True)

    def _cancel_inflight(self) -> None:
        if not self.inflight:
            return
        ray = ray_module()
        for ref in list(self.inflight):
            # a batch that already finished, or whose worker is gone, has nothing to cancel
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        self.inflight.clear()

    async def _feed(self, slot: int, scope: anyio.CancelScope) -> None:
        try:
            while (batch := await self._next()) is not None:
                result = await self._send(slot, batch)
                seq = getattr(batch, "seq")  # noqa: B009 - every batch type has one
                self._mark(seq)
                if await self.deliver(batch, result):
                    self._stop()
        except Exception as exc:
            if self.failure is None:
                self.failure = exc
            self._stop()
            scope.cancel()

    def _stop(self) -> None:
        self.stopped = True
        self.moved.set()  # wake every feeder waiting for the window

    async def _next(self) -> B | None:
        """The next batch of the source, once the window allows it; None at the end."""
        async with self.reading:
            while not self.stopped and self.taken >= self.oldest + self.window:
                await self.moved.wait()
            if self.stopped or self.exhausted:
                return None
            # Ray Data executes as its iterator is drained: a blocking call, off the loop
            batch = await anyio.to_thread.run_sync(next, self.source, None, abandon_on_cancel=True)
            if batch is None:
                self.exhausted = True
                return None
            self.taken += 1
        if self.before_send is not None:
            self.before_send()
        return await self.prepare(batch) if self.prepare is not None else batch

    async def _send(self, slot: int, batch: B) -> R:
        """Run ``batch`` on the slot's worker, on its replacement if it dies."""
        size = len(batch) if hasattr(batch, "__len__") else 0
        self.running[slot] += size
        try:
            return await self._send_to(slot, batch)
        finally:
            self.running[slot] -= size

    async def _send_to(self, slot: int, batch: B) -> R:
        while True:
            handle = self.pool.handle(slot)
            ref = self.call(handle, batch)
            self.inflight.add(ref)
            try:
                result: R = await ref
                return result
            except Exception as exc:
                error = unwrap_task_error(exc)
                if not isinstance(error, ActorDied):
                    raise error from None
                self.events.emit(
                    "cluster.worker_died",
                    level="warning",
                    worker=slot,
                    batch=getattr(batch, "seq", None),
                    detail=str(error)[:300],
                )
                await self.pool.replace(slot, handle)
                if self.rerun is not None:
                    await self.rerun(batch)
            finally:
                self.inflight.discard(ref)

    def _mark(self, seq: int) -> None:
        self.delivered.add(seq)
        moved = False
        while self.oldest in self.delivered:
            self.delivered.discard(self.oldest)
            self.oldest += 1
            moved = True
        if moved:
            self.moved.set()
            self.moved = anyio.Event()


def _close_when_idle(close: Callable[[], object]) -> None:
    """``close()``, once a read abandoned by a cancelled feeder has returned (closing a
    generator that a thread is running raises ``ValueError``); runs in a thread.  What
    closing raises is dropped: the pass has its own outcome to report."""
    deadline = time.monotonic() + _CLOSE_TIMEOUT
    while True:
        try:
            close()
        except ValueError as exc:
            if "already executing" not in str(exc) or time.monotonic() > deadline:
                return
            time.sleep(0.05)  # this thread's own wait for the reading one
        except Exception:
            return
        else:
            return
