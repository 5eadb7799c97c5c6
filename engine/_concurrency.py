"""Run a few awaitables concurrently in a task group and get results in order.

Unlike a bare task group, the first failure is re-raised as itself (not wrapped in an
ExceptionGroup) after the siblings are cancelled, which keeps the engine's error tree
usable with plain ``except``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import anyio

__all__ = ["run_all"]

T = TypeVar("T")


async def run_all(thunks: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Await every thunk concurrently; results in input order; first error re-raised."""
    results: list[T | None] = [None] * len(thunks)
    failure: list[BaseException] = []

    async def one(index: int, scope: anyio.CancelScope) -> None:
        try:
            results[index] = await thunks[index]()
        except Exception as exc:
            if not failure:
                failure.append(exc)
            scope.cancel()

    async with anyio.create_task_group() as tg:
        for index in range(len(thunks)):
            tg.start_soon(one, index, tg.cancel_scope)
    if failure:
        raise failure[0]
    return results  # type: ignore[return-value]
