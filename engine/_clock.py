"""The engine's clock: the running event loop's, so timers and deadlines agree.

Sleeps, timeouts and aiolimiter's buckets all run on the event loop's clock; reading
the same clock for deadlines and pauses keeps them consistent, and lets tests run the
whole engine on a fast-forwarded loop clock (``looptime``) with no real waiting.
Outside a running loop it is `time.monotonic`, which is what asyncio's loop clock is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

__all__ = ["Clock", "loop_time"]

Clock = Callable[[], float]
"""A monotonic clock in seconds: ``loop_time`` by default, a `FakeClock` in tests."""


def loop_time() -> float:
    """The running event loop's clock, else `time.monotonic`."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()
