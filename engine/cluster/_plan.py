"""Planning one cluster evaluation at the driver: every check `evaluate` makes, before
any call, and how the work is laid out over the pool (concurrency shares, batch size,
how the cache is shared)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .._aggregate import check_racing, is_mean
from .._errors import ConfigError
from .._evaluate import validate_examples
from .._events import Emitter
from .._options import EvaluationOptions
from .._outcome import GlobalMetric
from .._prompt import Prompt
from .._scoring import MetricRunner, check_metric
from .._types import Example
from ..cache import Cache, PostgresStore
from ..endpoint import Endpoint
from ._source import FileDataset
from ._worker import CacheSpec

__all__ = ["Plan", "plan"]


_STORE_OPTIONS = (
    "url",
    "table",
    "flush_interval",
    "wait_for_commit",
    "max_pending",
    "pool_size",
    "poll_interval",
    "connect_timeout",
    "command_timeout",
)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """An evaluation, checked and laid out over the pool."""

    prompt: Prompt
    endpoint: Endpoint
    emitter: Emitter
    runner: MetricRunner
    examples: Iterable[Example]
    total: int | None
    global_metric: GlobalMetric | None
    slots: list[int]
    shares: tuple[int, ...]
    batch_size: int
    metric_threads: int
    cache: Cache | None
    cache_spec: CacheSpec
    validate: bool


def _cache_spec(cache: Cache | None, examples: Iterable[Example]) -> CacheSpec:
    if cache is None:
        return CacheSpec(mode="none")
    store = cache.store
    if isinstance(store, PostgresStore):
        options = {name: getattr(store, name) for name in _STORE_OPTIONS}
        return CacheSpec(mode="shared", store=options, claim_ttl=cache.claim_ttl)
    if isinstance(examples, FileDataset):
        raise ConfigError(
            f"a file dataset on a cluster streams past the driver, so its cache must be "
            f"one every worker opens: Cache(PostgresStore(url)) ([cache] url), or none; "
            f"{type(store).__name__} is the driver's alone"
        )
    return CacheSpec(mode="relay")


def _shares(concurrency: int, workers: int) -> tuple[int, ...]:
    """The endpoint's concurrency split over workers (it holds for the whole cluster)."""
    used = max(1, min(workers, concurrency))
    return tuple(concurrency // used + (1 if i < concurrency % used else 0) for i in range(used))


def _batch_size(given: int | None, total: int | None, workers: int, share: int) -> int:
    if given is not None:
        return given
    if total is None:
        return 256
    # a few batches per worker and depth (balance), each enough to keep its calls busy;
    # but never so big that a small set leaves a worker without a batch
    busy = max(2 * share, math.ceil(total / (workers * 8)))
    return max(1, min(512, busy, math.ceil(total / workers)))


async def plan(
    prompt: Prompt,
    examples: Iterable[Example],
    options: EvaluationOptions,
    *,
    workers: int,
    batch_size: int | None,
) -> Plan:
    """Check everything `evaluate` checks locally, before any call is made."""
    o = options
    endpoint = Endpoint.of(o.model, limits=o.limits)
    runner = MetricRunner(o.metric, timeout=o.metric_timeout, threads=o.metric_threads)
    total = len(examples) if isinstance(examples, Sequence) else None
    if isinstance(examples, Sequence) and o.validate:
        validate_examples(prompt, examples)
        await check_metric(runner, examples[0])
    if o.must_beat is not None and not isinstance(examples, FileDataset):
        check_racing(o.must_beat, total, o.global_metric)
    width = o.concurrency if o.concurrency is not None else endpoint.limits.concurrency
    if width < 1:
        raise ConfigError("concurrency must be at least 1")
    shares = _shares(width, workers)
    return Plan(
        prompt=prompt,
        endpoint=endpoint,
        emitter=o.emitter(prompt),
        runner=runner,
        examples=examples,
        total=total,
        global_metric=None if is_mean(o.global_metric) else o.global_metric,
        slots=list(range(len(shares))),
        shares=shares,
        batch_size=_batch_size(batch_size, total, len(shares), max(shares)),
        metric_threads=o.metric_threads,
        cache=o.cache,
        cache_spec=_cache_spec(o.cache, examples),
        validate=o.validate,
    )
