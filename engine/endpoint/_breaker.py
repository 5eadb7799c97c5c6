"""`CircuitBreaker`: stop calling an endpoint that nothing answers at.

After ``threshold`` consecutive connection failures (`ConnectionFailedError`: refused,
unknown host, connect timeout) with no success since, the breaker opens: the call
that tripped it and every call that would start, or is sleeping before a retry, fails at
once with `EndpointUnreachableError`, which is fatal for the run.  After ``cooldown``
seconds it lets calls through again, one failure away from opening, so a service that
shares the endpoint recovers when the server comes back.

An endpoint that has never answered opens after at most ``FIRST_CONTACT`` failures: a
wrong port or host is known after a few refusals, and one call retrying alone (the
optimizer's first description call) would otherwise back off for half a minute before
the run says what is wrong.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import anyio

from .._errors import ConnectionFailedError, EndpointUnreachableError

__all__ = ["FIRST_CONTACT", "CircuitBreaker"]

FIRST_CONTACT = 3  # connection failures that open the breaker of a never-answered endpoint


class CircuitBreaker:
    """Counts connection failures in a row for one endpoint; opens at ``threshold``."""

    __slots__ = (
        "_answered",
        "_clock",
        "_cooldown",
        "_failures",
        "_last",
        "_open_until",
        "_opened",
        "_threshold",
    )

    def __init__(
        self,
        threshold: int | None,
        *,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = threshold  # None: never opens
        self._cooldown = cooldown  # seconds open before calls may try again
        self._clock = clock
        self._failures = 0  # connection failures since the last success
        self._answered = False  # any success yet: then only ``threshold`` opens it
        self._open_until = -math.inf  # clock time before which every call fails
        self._last: ConnectionFailedError | None = None  # the failure that tripped it
        self._opened: anyio.Event | None = None  # set when the breaker opens (sleepers wake)

    @property
    def is_open(self) -> bool:
        # never opened (the usual case): no clock to read, twice per attempt
        return self._open_until != -math.inf and self._clock() < self._open_until

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def check(self, endpoint: str) -> None:
        """Raise `EndpointUnreachableError` while the breaker is open (nothing is sent)."""
        if self.is_open:
            error = self._error(endpoint)
            error.sent = False
            raise error

    def on_success(self) -> None:
        self._failures = 0
        self._answered = True

    @property
    def _limit(self) -> int | None:
        if self._threshold is None or self._answered:
            return self._threshold
        return min(self._threshold, FIRST_CONTACT)

    def on_failure(self, exc: BaseException, endpoint: str) -> None:
        """Count a failed attempt; a connection failure may open the breaker (and raise)."""
        if not isinstance(exc, ConnectionFailedError):
            return
        self._failures += 1
        self._last = exc
        limit = self._limit
        if limit is None or self._failures < limit:
            return
        # one failure away from opening again once the cool-down is over
        self._failures = limit - 1
        self._open_until = self._clock() + self._cooldown
        if self._opened is not None:
            self._opened.set()
            self._opened = None
        raise self._error(endpoint) from exc

    async def sleep(self, seconds: float, endpoint: str) -> None:
        """Sleep ``seconds``, or raise at once if the breaker opens meanwhile."""
        self.check(endpoint)
        if seconds <= 0:
            return
        if self._opened is None:
            self._opened = anyio.Event()
        opened = self._opened
        with anyio.move_on_after(seconds):
            await opened.wait()
        self.check(endpoint)

    def rebind(self) -> None:
        """Forget what belongs to an event loop that has ended (its Event, times on
        its clock); the count of failures stays."""
        self._open_until = -math.inf
        self._opened = None

    def _error(self, endpoint: str) -> EndpointUnreachableError:
        cause = self._last.detail if self._last is not None else "connection failures"
        return EndpointUnreachableError(
            f"{cause}; {self._limit} connection failures in a row and no success since, "
            f"so every call to this endpoint now fails at once (retried after "
            f"{self._cooldown:g}s)",
            endpoint=endpoint,
        )
