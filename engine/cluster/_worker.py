"""A cluster worker: an async Ray actor that runs the engine's own `evaluate` on batches.

The driver sends each evaluation's `Job` once, by reference (`ray.put`); a worker
opens it on its first batch: the adapter rebuilt from its pickle, wrapped in a
`LeasedModel` under the endpoint's cluster-wide rate budget and in an `Endpoint` with
the user's retry policy and this worker's share of the concurrency; the metric; the
cache.  Each batch then is one plain `evaluate` call.  What comes back is a
`BatchResult`: the batch's outcomes and what they cost, never a partial state the
driver would have to reconcile.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from .._budget import BudgetMeter
from .._errors import DataError, EngineError
from .._evaluate import evaluate
from .._events import Emitter, Event
from .._options import ErrorPolicy
from .._outcome import Evaluation, Outcome
from .._prompt import Prompt
from .._redact import register_secret
from .._scoring import MetricRunner, check_metric
from .._types import Example, Usage
from ..cache import Cache, PostgresStore
from ..endpoint import Endpoint, Limits, RetryPolicy
from ..program import ProgramSetup, dry_run, program_setup
from ..tracing import adopt_trace
from ._leased import LeasedModel
from ._racing import RaceReporter
from ._source import Batch, FileBatch
from ._spend import SpendLease

__all__ = [
    "BatchResult",
    "CacheSpec",
    "CheckResult",
    "ClusterWorker",
    "Job",
    "StageEndpoint",
    "check_inputs",
]

CacheMode = Literal["none", "shared", "relay"]
_KEPT_EVENTS = 50  # events of one batch sent back to the driver, at most


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheSpec:
    """How workers cache: not at all, in a shared store each worker opens (``store``:
    `PostgresStore` arguments), or relayed (rows seeded and written back by the driver)."""

    mode: CacheMode
    store: Mapping[str, Any] = field(default_factory=dict)
    claim_ttl: float = 10.0


@dataclass(frozen=True, kw_only=True, slots=True)
class StageEndpoint:
    """One endpoint of a program's prompts, as a worker rebuilds it."""

    model: Any  # the adapter, without its driver-side Endpoint
    name: str
    namespace: str
    retry: RetryPolicy
    budget: Any  # the endpoint's RateBudget actor handle
    shares: tuple[int, ...]  # its concurrency on each worker slot
    limits: Limits  # the endpoint's (its budget actor's, should that restart)


@dataclass(frozen=True, kw_only=True)
class Job:
    """Everything a worker needs for one evaluation (pickled once by the driver)."""

    job_id: str
    prompt: Prompt
    model: Any  # the adapter, without its driver-side Endpoint
    name: str
    namespace: str
    retry: RetryPolicy
    shares: tuple[int, ...]  # concurrency of each worker slot
    metric: Any
    metric_concurrency: int | None
    metric_timeout: float | None
    metric_threads: int
    on_error: ErrorPolicy
    cache: CacheSpec
    budget: Any  # the endpoint's RateBudget actor handle
    limits: Limits  # the endpoint's (its budget actor's, should that restart)
    tally: Any = None  # the RacingTally actor handle, when racing
    ledger: Any = None  # the SpendLedger actor handle, when the run has a budget meter
    check_metric: bool = True
    secrets: tuple[str, ...] = ()  # values the driver redacts; the worker must too
    trace_context: dict[str, str] = field(default_factory=dict)  # the driver's trace
    # a program (found by module path on the worker), its prompts, and for each prompt
    # the index of its endpoint in ``stages`` (prompts on one adapter share one)
    program: Any = None
    prompts: Mapping[str, Prompt] = field(default_factory=dict)
    stages: tuple[StageEndpoint, ...] = ()
    stage_of: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One batch's outcomes (positions within the batch) and what they cost."""

    seq: int
    slot: int
    examples: int  # in the batch (outcomes may be fewer when racing cut it)
    outcomes: list[Outcome]
    calls: int
    retries: int
    usage: Usage
    charged_calls: dict[str, int]
    charged_usage: dict[str, Usage]
    written: dict[str, str]
    events: list[tuple[str, str, dict[str, Any]]]
    stopped: bool
    hedges: int = 0  # duplicate requests sent by hedging (in ``calls``)
    # the worker meter's hedges per model: sent, won and their estimated usage (which
    # ``charged_usage`` holds already)
    charged_hedges: dict[str, tuple[int, int, Usage]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A validated batch: its example count, or the first error in it."""

    seq: int
    examples: int
    error: Exception | None


def check_inputs(prompt: Prompt, example: Example, where: str) -> None:
    """The row's inputs are exactly the prompt's placeholders (as `validate_examples`)."""
    names = set(example.inputs)
    missing = prompt.placeholders - names
    if missing:
        raise DataError(
            f"id {example.id!r}: inputs lack placeholder(s) {sorted(missing)}", location=where
        )
    extra = names - prompt.placeholders
    if extra:
        raise DataError(
            f"id {example.id!r}: input(s) {sorted(extra)} are not placeholders of the prompt "
            f"(it uses {sorted(prompt.placeholders)})",
            location=where,
        )


class _SeededStore:
    """The store of a relayed batch: rows the driver sent, and the rows written here."""

    def __init__(self, seed: Mapping[str, str]) -> None:
        self.seed = seed
        self.written: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        value = self.written.get(key)
        return value if value is not None else self.seed.get(key)

    async def put(self, key: str, value: str) -> None:
        self.written[key] = value

    async def aclose(self) -> None:
        return None


class _Collector:
    """Outcomes and events of one batch as `evaluate` reports them."""

    def __init__(self, reporter: RaceReporter | None) -> None:
        self.outcomes: list[Outcome] = []
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.retries = 0
        self.reporter = reporter

    def outcome(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if self.reporter is not None:
            self.reporter.add(outcome)

    def event(self, event: Event) -> None:
        if event.name == "call.retry":
            self.retries += 1
        elif event.name.startswith(("endpoint.", "metric.")) and len(self.events) < _KEPT_EVENTS:
            self.events.append((event.name, "info", dict(event.data)))  # the driver tells


class _Opened:
    """A job opened in this worker: its endpoints, its cache, its program."""

    def __init__(self, job: Job, slot: int, store: PostgresStore | None) -> None:
        for secret in job.secrets:
            register_secret(secret)
        self.job = job
        self.slot = slot
        self.share = job.shares[slot % len(job.shares)]
        self.leased: list[LeasedModel] = []
        self.program: ProgramSetup | None = None
        if job.program is None:
            self.endpoint = self._endpoint(
                StageEndpoint(
                    model=job.model,
                    name=job.name,
                    namespace=job.namespace,
                    retry=job.retry,
                    budget=job.budget,
                    shares=job.shares,
                    limits=job.limits,
                )
            )
        else:
            built = [self._endpoint(stage) for stage in job.stages]
            endpoints = {name: built[job.stage_of[name]] for name in job.prompts}
            self.program = program_setup(job.prompts, job.program, endpoints)
            self.endpoint = self.program.first
        # Its calls hold their concurrency slot until their answer is committed: a
        # killed worker has cost at most its share in calls nobody can reuse.
        self.cache = (
            Cache(store, claim_ttl=job.cache.claim_ttl, max_unsaved=self.share)
            if store is not None
            else None
        )
        self.runner = MetricRunner(
            job.metric, timeout=job.metric_timeout, threads=job.metric_threads
        )

    def _endpoint(self, stage: StageEndpoint) -> Endpoint:
        job, share = self.job, stage.shares[self.slot % len(stage.shares)]
        # No call without a permit of the run's budget (leased a share at a time).
        spend = SpendLease(job.ledger, job.job_id, want=share) if job.ledger is not None else None
        leased = LeasedModel(
            stage.model, stage.budget, name=stage.name,
            max_wait=stage.retry.max_retry_after, spend=spend, limits=stage.limits,
        )  # fmt: skip
        self.leased.append(leased)
        return Endpoint(
            leased,
            limits=Limits(concurrency=share),  # the rate is the budget actor's
            retry=stage.retry,
            name=stage.name,
            namespace=stage.namespace,
        )

    def batch_cache(self, batch: Batch) -> tuple[Cache | None, _SeededStore | None]:
        if self.job.cache.mode == "shared":
            return self.cache, None
        if self.job.cache.mode == "relay":
            store = _SeededStore(getattr(batch, "seed", None) or {})
            return Cache(store), store
        return None, None

    async def close(self) -> None:
        for leased in self.leased:
            await leased.release()
        if self.cache is not None:
            flush = getattr(self.cache.store, "flush", None)
            if flush is not None:
                await flush()  # the driver reads these rows next
        models = [self.job.model, *(stage.model for stage in self.job.stages)]
        for model in {id(m): m for m in models}.values():
            closer = getattr(model, "aclose", None)
            if closer is not None:
                await closer()


class ClusterWorker:
    """The body of a worker actor (``slot``: its place in the pool, kept by a
    replacement).  Methods are called by the driver only."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.jobs: dict[str, _Opened] = {}
        self.locks: dict[str, anyio.Lock] = {}
        self.stores: dict[tuple[tuple[str, Any], ...], PostgresStore] = {}

    async def ping(self) -> int:
        """The worker's process id (tests kill it by this)."""
        return os.getpid()

    async def _open(self, job_id: str, box: list[Any]) -> _Opened:
        opened = self.jobs.get(job_id)
        if opened is not None:
            return opened
        lock = self.locks.setdefault(job_id, anyio.Lock())
        async with lock:
            opened = self.jobs.get(job_id)
            if opened is None:
                job: Job = await box[0]
                store = await self._store(job.cache) if job.cache.mode == "shared" else None
                opened = self.jobs[job_id] = _Opened(job, self.slot, store)
        return opened

    async def _store(self, spec: CacheSpec) -> PostgresStore:
        """One store per database table per worker, shared by its jobs."""
        key = tuple(sorted(spec.store.items()))
        store = self.stores.get(key)
        if store is None:
            # A worker's answers are committed before it takes more work: when it is
            # killed, only its calls in flight are paid again (wait_for_commit).
            options = dict(spec.store)
            if options.get("wait_for_commit") is None:
                options["wait_for_commit"] = True
            store = self.stores[key] = await PostgresStore(**options).open()
        return store

    async def run(self, job_id: str, box: list[Any], batch: Batch) -> BatchResult:
        """Evaluate one batch; stops early (with what it has) when racing says so."""
        opened = await self._open(job_id, box)
        job = opened.job
        adopt_trace(job.trace_context)  # this call's task continues the driver's trace
        examples = await batch.load()
        cache, seeded = opened.batch_cache(batch)
        reporter = RaceReporter(job.tally, job.job_id, batch.seq) if job.tally is not None else None
        collector = _Collector(reporter)
        meter = BudgetMeter(None, [])
        evaluation, failure = None, None
        async with anyio.create_task_group() as tg:
            if reporter is not None:
                tg.start_soon(reporter.watch, tg.cancel_scope)
            try:
                evaluation = await evaluate(
                    job.prompts or job.prompt,
                    examples,
                    model=opened.endpoint,
                    program=opened.program,
                    metric=job.metric,
                    cache=cache,
                    on_error=job.on_error,
                    on_outcome=collector.outcome,
                    keep_outcomes=False,
                    concurrency=opened.share,
                    metric_concurrency=job.metric_concurrency,
                    metric_timeout=job.metric_timeout,
                    metric_threads=job.metric_threads,
                    progress_interval=3600.0,
                    events=Emitter(collector.event),
                    meter=meter,
                    validate=False,  # the driver checked the data and the metric
                )
                if reporter is not None:
                    await reporter.flush()  # the tally sees this batch whole
            except Exception as exc:  # re-raised as itself, not as an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        models = {p.model for p in job.prompts.values()} if job.prompts else {job.prompt.model}
        return self._result(batch, len(examples), models, collector, meter, evaluation, seeded)

    def _result(
        self,
        batch: Batch,
        examples: int,
        models: set[str],
        collector: _Collector,
        meter: BudgetMeter,
        evaluation: Evaluation | None,
        seeded: _SeededStore | None,
    ) -> BatchResult:
        if evaluation is not None:
            calls, usage, hedges = evaluation.calls, evaluation.usage, evaluation.hedges
        else:  # cut by racing: what the prompts' own models were charged
            calls = sum(meter.calls.get(model, 0) for model in models)
            usage = sum((meter.usage.get(model, Usage()) for model in models), Usage())
            hedges = sum(meter.hedges.get(model, 0) for model in models)
        stopped = evaluation is None or (collector.reporter is not None and collector.reporter.stop)
        return BatchResult(
            seq=batch.seq,
            slot=self.slot,
            examples=examples,
            outcomes=collector.outcomes,
            calls=calls,
            retries=collector.retries,
            usage=usage,
            charged_calls=dict(meter.calls),
            charged_usage=dict(meter.usage),
            written=seeded.written if seeded is not None else {},
            events=collector.events,
            stopped=stopped,
            hedges=hedges,
            charged_hedges={
                model: (sent, meter.hedges_won.get(model, 0), meter.hedge_usage.get(model, Usage()))
                for model, sent in meter.hedges.items()
            },
        )

    async def check(self, job_id: str, box: list[Any], batch: FileBatch) -> CheckResult:
        """Read and validate a file batch (no call is made): count, or first error."""
        opened = await self._open(job_id, box)
        prompt, program = opened.job.prompt, opened.program
        try:
            located = await batch.load_located()
            for where, example in located:
                if program is None:  # a program's prompts are rendered by its code
                    check_inputs(prompt, example, where)
            if batch.seq == 0 and located and opened.job.check_metric:
                if program is not None:
                    await dry_run(program, located[0][1])
                await check_metric(opened.runner, located[0][1])
        except EngineError as exc:
            return CheckResult(batch.seq, 0, exc)
        return CheckResult(batch.seq, len(located), None)

    async def finish(self, job_id: str) -> None:
        """The evaluation is over: hand back permits, commit the cache, close the adapter."""
        opened = self.jobs.pop(job_id, None)
        self.locks.pop(job_id, None)
        if opened is not None:
            await opened.close()

    async def shutdown(self) -> None:
        """Commit and close every store (the cluster is closing)."""
        for store in self.stores.values():
            await store.aclose()
        self.stores.clear()
