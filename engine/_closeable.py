"""`AsyncCloseable`: what every resource-holding object of the engine does on ``async with``.

Stores, caches, clusters and adapters hold connections, files and threads.  ``async
with obj`` opens it (``open``, when it has something to open) and always releases it
with ``aclose``, shielded from cancellation: a cancelled run still commits its writes
and closes its connections.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import anyio

__all__ = ["AsyncCloseable"]


class AsyncCloseable:
    """Base for objects that hold resources; subclasses implement `aclose` (and `open`
    when opening does anything)."""

    async def open(self) -> Self:
        """Acquire what the object needs before use (nothing by default)."""
        return self

    async def aclose(self) -> None:
        """Release everything the object holds."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()
