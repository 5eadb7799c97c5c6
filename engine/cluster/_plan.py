"""Planning one cluster evaluation at the driver: every check `evaluate` makes, before
any call, and how the work is laid out over the pool (concurrency shares, batch size,
how the cache is shared)."""

from __future__ import annotations

import importlib
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
from ..program import ProgramSetup, dry_run
from ._source import FileDataset
from ._worker import CacheSpec

__all__ = ["Plan", "check_importable", "plan"]


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
    program: ProgramSetup | None = None

    @property
    def identity(self) -> str:
        """The identity of the predictions: the prompt's hash, or the program's."""
        return self.program.identity if self.program is not None else self.prompt.hash

    def stage_shares(self, endpoint: Endpoint) -> tuple[int, ...]:
        """``endpoint``'s concurrency split over the slots (one entry per slot)."""
        return _shares(endpoint.limits.concurrency, len(self.slots))


def check_importable(program: object) -> None:
    """A program travels to the workers by reference: its function (or its object's
    class) must be found again there by module path; `ConfigError` when it is not."""
    target = program if hasattr(program, "__qualname__") else type(program)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", "?")
    found: object = None
    if module != "__main__" and "<locals>" not in qualname:
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    if found is not target:
        raise ConfigError(
            f"a program on a cluster must be importable by module path on the workers "
            f"(as 'module:function'); {module}:{qualname} is not (define it at the top "
            f"level of a module the workers can import, not in __main__ or a function)"
        )


def _cache_spec(
    cache: Cache | None, examples: Iterable[Example], *, program: bool = False
) -> CacheSpec:
    if cache is None:
        return CacheSpec(mode="none")
    store = cache.store
    if isinstance(store, PostgresStore):
        options = {name: getattr(store, name) for name in _STORE_OPTIONS}
        return CacheSpec(mode="shared", store=options, claim_ttl=cache.claim_ttl)
    if program:
        # a relayed batch carries the rows of its examples; a program's calls are keyed
        # by what it sends, unknown before it runs: the driver cannot seed them
        raise ConfigError(
            f"a program on a cluster needs a cache every worker opens: "
            f"Cache(PostgresStore(url)) ([cache] url), or none (cache=False to optimize); "
            f"{type(store).__name__} is the driver's alone"
        )
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
    o, program = options, options.program
    endpoint = Endpoint.of(o.model, limits=o.limits)
    runner = MetricRunner(o.metric, timeout=o.metric_timeout, threads=o.metric_threads)
    total = len(examples) if isinstance(examples, Sequence) else None
    if program is not None:
        check_importable(program.program)
    cache_spec = _cache_spec(o.cache, examples, program=program is not None)
    if isinstance(examples, Sequence) and o.validate:
        validate_examples(program.prompts if program else prompt, examples)
        if program is not None:
            await dry_run(program, examples[0])
        await check_metric(runner, examples[0])
    if o.must_beat is not None and not isinstance(examples, FileDataset):
        check_racing(o.must_beat, total, o.global_metric)
    stages = [endpoint] if program is None else list(program.endpoints.values())
    width = o.concurrency
    if width is None:  # a program: as wide as its widest endpoint, as locally
        width = max(e.limits.concurrency for e in stages)
    if width < 1:
        raise ConfigError("concurrency must be at least 1")
    if program is not None:  # every slot holds a call slot of each endpoint, within its limit
        workers = min(workers, *(e.limits.concurrency for e in stages))
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
        cache_spec=cache_spec,
        validate=o.validate,
        program=program,
    )
