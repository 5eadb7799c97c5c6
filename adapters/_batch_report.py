"""What a batch prefill did, and the bookkeeping `OpenAIBatch` and `AnthropicBatch` share.

Both fill the prediction cache the same way: the cache misses are split into batches
within the API's limits, each batch is polled with growing waits until it ends or the
deadline passes, and each item is counted as filled, failed or expired.  Those parts
live here, free of any SDK or HTTP stack, so `AnthropicBatch` never imports the OpenAI
SDK to share them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import anyio

from engine import (
    Cache,
    CachedPrediction,
    Completion,
    ConfigError,
    Example,
    NoContentError,
    TransientError,
)

__all__ = ["BatchReport", "poll_until_ended", "split_batches"]

_Item = TypeVar("_Item")
_Batch = TypeVar("_Batch")


@dataclass
class BatchReport:
    """What a `OpenAIBatch.prefill` did; ``failures`` maps example id -> reason."""

    already_cached: int = 0
    submitted: int = 0
    filled: int = 0
    failed: int = 0
    expired: int = 0
    batches: list[str] = field(default_factory=list)
    statuses: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def missing(self) -> int:
        """Examples still without a prediction: the normal path will pay for these."""
        return self.submitted - self.filled

    async def misses(
        self, examples: Sequence[Example], *, cache: Cache, request: str
    ) -> list[Example]:
        """The ``examples`` without a cached prediction for ``request``, in order; the
        others are counted as already cached."""
        missing = []
        for example in examples:
            if await cache.has_prediction(request, example):
                self.already_cached += 1
            else:
                missing.append(example)
        return missing

    def expire(self, example: Example) -> None:
        """Count ``example`` as expired: the batch window closed before its turn."""
        self.expired += 1
        self.failures[example.id] = "expired"

    def fail(self, example: Example, reason: str) -> None:
        """Count ``example`` as failed, for ``reason``."""
        self.failed += 1
        self.failures[example.id] = reason

    async def fill(
        self,
        example: Example,
        parse: Callable[[], Completion],
        *,
        cache: Cache,
        request: str,
        unusable: tuple[type[Exception], ...] = (TransientError,),
    ) -> None:
        """Store the answer ``parse`` reads under (``request``, ``example``), or count
        the item failed when it is a refusal or one of the ``unusable`` errors."""
        try:
            completion = parse()
        except NoContentError as exc:
            # a refusal or tool call is an outcome to report, never an empty prediction
            self.fail(example, exc.message)
            return
        except unusable as exc:
            self.fail(example, f"unusable output ({exc})")
            return
        value = CachedPrediction(completion.text, completion.usage)
        await cache.put_prediction(request, example, value)
        self.filled += 1


def split_batches(
    items: Iterable[tuple[_Item, int]], *, max_requests: int, max_bytes: int, unit: str
) -> list[list[_Item]]:
    """``items`` (each with its size in bytes) in order, cut into batches of at most
    ``max_requests`` items and ``max_bytes`` bytes; ``unit`` names the limit in errors."""
    chunks: list[list[_Item]] = [[]]
    size = 0
    for item, length in items:
        if length > max_bytes:
            raise ConfigError(f"one batch request is {length} bytes, over the {unit} limit")
        if len(chunks[-1]) >= max_requests or size + length > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += length
    return [c for c in chunks if c]


async def poll_until_ended(
    fetch: Callable[[], Awaitable[_Batch]],
    status_of: Callable[[_Batch], str],
    ended: Callable[[str], bool],
    *,
    interval: float,
    max_interval: float,
    deadline: float | None,
    report: BatchReport,
    batch_id: str,
) -> _Batch | None:
    """Fetch a batch until ``ended`` says its status is final, waiting ``interval``
    seconds at first and 1.5x longer each time (at most ``max_interval``).

    Returns the ended batch, its status noted in ``report.statuses[batch_id]``; or
    ``None`` when ``deadline`` seconds passed first (noted too: its items stay misses)."""
    wait, started = interval, anyio.current_time()
    while True:
        batch = await fetch()
        status = status_of(batch)
        if ended(status):
            report.statuses[batch_id] = status
            return batch
        if deadline is not None and anyio.current_time() - started > deadline:
            report.statuses[batch_id] = f"gave up polling ({status})"
            return None
        await anyio.sleep(wait)
        wait = min(wait * 1.5, max_interval)
