"""One `evaluate` on a cluster, at the driver: check, plan, feed, deliver, summarise.

The driver does what needs the whole picture and nothing per call: it checks the
arguments and the data before anything is paid (a file dataset in a validation pass on
the workers), ships the job once, feeds batches (`Feeder`), puts the results back in
dataset order and hands each outcome to ``on_outcome`` as a local run would, charges
the run's budget meter, and builds the same `Evaluation` a local run returns (exact
fractions: the score does not depend on the order outcomes arrive in).

Caching follows the store of the ``cache`` given:

- a `PostgresStore`: every worker opens its own on the same table (``shared``), with
  single flight across them (`engine.Cache`);
- any other store (memory, SQLite): the driver is its only user (``relay``).  It looks
  up the rows of each batch's examples before sending it (the batch carries them) and
  writes back the rows the batch produced, so the next local evaluation (the trainer's
  batch step) and a resumed run find them;
- none.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .._budget import BudgetMeter
from .._cache import Cache
from .._endpoint import _SHARED_ATTRIBUTE, Endpoint
from .._errors import ConfigError, DataError, MetricError
from .._evaluate import is_mean, validate_examples
from .._events import Emitter
from .._identity import metric_identity
from .._limits import Limits
from .._outcome import Evaluation, GlobalMetric, Outcome
from .._postgres import PostgresStore
from .._prompt import Prompt
from .._protocols import ChatModel, Metric
from .._redact import known_secrets
from .._scoring import MetricRunner, check_metric
from .._tally import Tally
from .._types import Example, MetricResult
from ._dispatch import Feeder
from ._ray import ray_module
from ._source import ExampleBatch, FileBatch, FileDataset, example_batches, file_batches
from ._worker import BatchResult, CacheSpec, CheckResult, Job, check_inputs

if TYPE_CHECKING:
    from ._cluster import RayCluster

__all__ = ["evaluate_on"]

OutcomeCallback = Callable[[Outcome], Awaitable[None] | None]
_STORE_OPTIONS = (
    "url",
    "table",
    "flush_interval",
    "max_pending",
    "pool_size",
    "poll_interval",
    "connect_timeout",
    "command_timeout",
)


@dataclass(frozen=True, kw_only=True)
class _Plan:
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


# -- checks -----------------------------------------------------------------------------
def _check_racing(must_beat: float, total: int | None, global_metric: Any) -> None:
    if not is_mean(global_metric):
        raise ConfigError("must_beat (racing) needs the mean; a global metric turns it off")
    if total is None:
        raise ConfigError("must_beat (racing) needs a dataset with a known length")
    if math.isnan(must_beat) or not 0.0 <= must_beat <= 1.0:
        raise ConfigError(f"must_beat must be in [0, 1], got {must_beat!r}")


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
    # a few batches per worker and depth (balance), each enough to keep its calls busy
    return max(1, min(512, max(2 * share, math.ceil(total / (workers * 8)))))


async def plan(
    cluster: RayCluster,
    prompt: Prompt,
    examples: Iterable[Example],
    *,
    model: ChatModel | Endpoint,
    metric: Metric,
    cache: Cache | None,
    limits: Limits | None,
    must_beat: float | None,
    global_metric: GlobalMetric | None,
    concurrency: int | None,
    metric_timeout: float | None,
    metric_threads: int,
    emitter: Emitter,
    validate: bool,
) -> _Plan:
    """Check everything `evaluate` checks locally, before any call is made."""
    endpoint = Endpoint.of(model, limits=limits)
    runner = MetricRunner(metric, timeout=metric_timeout, threads=metric_threads)
    total = len(examples) if isinstance(examples, Sequence) else None
    if isinstance(examples, Sequence) and validate:
        validate_examples(prompt, examples)
        await check_metric(runner, examples[0])
    if must_beat is not None and not isinstance(examples, FileDataset):
        _check_racing(must_beat, total, global_metric)
    width = concurrency if concurrency is not None else endpoint.limits.concurrency
    if width < 1:
        raise ConfigError("concurrency must be at least 1")
    shares = _shares(width, cluster.workers)
    return _Plan(
        prompt=prompt,
        endpoint=endpoint,
        emitter=emitter,
        runner=runner,
        examples=examples,
        total=total,
        global_metric=None if is_mean(global_metric) else global_metric,
        slots=list(range(len(shares))),
        shares=shares,
        batch_size=_batch_size(cluster.batch_size, total, len(shares), max(shares)),
        metric_threads=metric_threads,
        cache=cache,
        cache_spec=_cache_spec(cache, examples),
        validate=validate,
    )


# -- the job ----------------------------------------------------------------------------
@contextmanager
def _detached(model: Any) -> Iterator[None]:
    """The adapter without its driver-side `Endpoint` while it is pickled: limiters and
    breakers are local state, and the workers build their own."""
    shared = getattr(model, "__dict__", {}).pop(_SHARED_ATTRIBUTE, None)
    try:
        yield
    finally:
        if shared is not None:
            model.__dict__[_SHARED_ATTRIBUTE] = shared


def put_job(job: Job) -> Any:
    """``ray.put`` the job once; a part that cannot be pickled is a `ConfigError`."""
    ray = ray_module()
    with _detached(job.model):
        try:
            return ray.put(job)
        except Exception as exc:
            raise ConfigError(
                f"the model, metric and prompt travel to cluster workers by pickling, and "
                f"this one cannot be pickled: {type(exc).__name__}: {exc}"
            ) from exc


# -- the passes -------------------------------------------------------------------------
async def check_file(cluster: RayCluster, plan: _Plan, job_id: str, box: list[Any]) -> int:
    """Read and validate the whole file on the workers before any call; its size."""
    assert isinstance(plan.examples, FileDataset)
    counts: dict[int, int] = {}
    errors: dict[int, Exception] = {}

    async def deliver(batch: FileBatch, result: CheckResult) -> bool:
        if result.error is not None:
            errors[result.seq] = result.error
        counts[result.seq] = result.examples
        return bool(errors)  # batches before the error still finish: the first one wins

    feeder: Feeder[FileBatch, CheckResult] = Feeder(
        cluster,
        plan.slots,
        file_batches(plan.examples, plan.batch_size),
        lambda worker, batch: worker.check.remote(job_id, box, batch),
        deliver,
        events=plan.emitter,
    )
    await feeder.run()
    if errors:
        raise errors[min(errors)]
    total = sum(counts.values())
    if total == 0:
        raise DataError("the dataset is empty", location=str(plan.examples.path))
    return total


def _batches(plan: _Plan) -> Iterator[ExampleBatch | FileBatch]:
    if isinstance(plan.examples, FileDataset):
        return file_batches(plan.examples, plan.batch_size)
    return example_batches(plan.examples, plan.batch_size)


class _Relay:
    """The driver's side of a relayed cache: seed each batch, write its rows back."""

    def __init__(self, plan: _Plan) -> None:
        assert plan.cache is not None
        self.store = plan.cache.store
        self.request = plan.endpoint.request_key(plan.prompt)
        self.metric_id = metric_identity(plan.runner.metric)

    async def seed(self, batch: ExampleBatch) -> ExampleBatch:
        rows: dict[str, str] = {}
        for example in batch.examples:
            key = Cache.prediction_key(self.request, example)
            for name in (key, Cache.example_key(example)):
                raw = await self.store.get(name)
                if raw is not None:
                    rows[name] = raw
            if key in rows and self.metric_id is not None:
                text = _stored_text(rows[key])
                metric_key = Cache.metric_key(self.metric_id, example, text) if text else None
                raw = await self.store.get(metric_key) if metric_key is not None else None
                if raw is not None:
                    assert metric_key is not None
                    rows[metric_key] = raw
        return replace(batch, seed=rows)

    async def write_back(self, rows: dict[str, str]) -> None:
        for key, value in rows.items():
            await self.store.put(key, value)


def _stored_text(raw: str) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None  # a corrupted row: the worker's cache reports it
    text = data.get("text") if isinstance(data, dict) else None
    return text if isinstance(text, str) else None


class _Delivery:
    """Batch results back in dataset order: each outcome to the caller as a local run
    gives it, counts to a `Tally`, costs to the meter, progress to the events."""

    def __init__(
        self,
        plan: _Plan,
        *,
        on_outcome: OutcomeCallback | None,
        keep_outcomes: bool,
        meter: BudgetMeter | None,
        relay: _Relay | None,
        progress_interval: float,
    ) -> None:
        self.plan = plan
        self.on_outcome = on_outcome
        self.keep_outcomes = keep_outcomes
        self.meter = meter
        self.relay = relay
        self.progress_interval = progress_interval
        self.tally = Tally(plan.total, None)
        self.waiting: dict[int, tuple[ExampleBatch | FileBatch, BatchResult]] = {}
        self.next_seq = 0
        self.before = 0  # examples in the batches emitted so far
        self.outcomes: list[Outcome] = []
        self.results: list[tuple[int, MetricResult | None, str]] = []  # for a global metric
        self.per_worker: dict[int, list[int]] = {}  # slot -> [examples, calls]
        self.started = self.last_progress = time.monotonic()

    async def __call__(self, batch: ExampleBatch | FileBatch, result: BatchResult) -> bool:
        self._charge(result)
        if self.relay is not None and result.written:
            await self.relay.write_back(result.written)
        for name, level, data in result.events:
            self.plan.emitter.emit(name, level=level, **{**data, "worker": result.slot})
        if result.seq >= self.next_seq:
            self.waiting[result.seq] = (batch, result)
        while self.next_seq in self.waiting:
            ready, ready_result = self.waiting.pop(self.next_seq)
            self.next_seq += 1
            await self._emit(ready, ready_result)
        self._progress()
        return result.stopped

    def _charge(self, result: BatchResult) -> None:
        tally = self.tally
        tally.calls += result.calls
        tally.retries += result.retries
        tally.usage = tally.usage + result.usage
        counts = self.per_worker.setdefault(result.slot, [0, 0])
        counts[0] += len(result.outcomes)
        counts[1] += result.calls
        if self.meter is not None:
            for model, calls in result.charged_calls.items():
                for _ in range(calls):
                    self.meter.charge_call(model)
            for model, usage in result.charged_usage.items():
                self.meter.charge_usage(model, usage)

    async def _emit(self, batch: ExampleBatch | FileBatch, result: BatchResult) -> None:
        # file rows become examples in the worker (blank lines skipped): count them there
        first = batch.start if isinstance(batch, ExampleBatch) else self.before
        self.before += result.examples
        for outcome in sorted(result.outcomes, key=lambda o: o.index):
            placed = replace(outcome, index=first + outcome.index)
            self.tally.add(placed)
            if self.plan.global_metric is not None:
                message = placed.error.message if placed.error is not None else ""
                self.results.append((placed.index, placed.result, message))
            if self.keep_outcomes:
                self.outcomes.append(placed)
            if self.on_outcome is not None:
                maybe = self.on_outcome(placed)
                if maybe is not None:
                    await maybe

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress < self.progress_interval:
            return
        self.last_progress = now
        elapsed = max(now - self.started, 1e-9)
        t = self.tally
        self.plan.emitter.emit(
            "evaluation.progress",
            level="debug",
            done=t.completed,
            total=t.total,
            calls=t.calls,
            cache_hits=t.cache_hits,
            errors=t.errors,
            retries=t.retries,
            tokens=t.usage.total_tokens,
            elapsed=round(elapsed, 3),
            workers=[
                {"worker": slot, "done": n, "calls": calls, "per_s": round(n / elapsed, 1)}
                for slot, (n, calls) in sorted(self.per_worker.items())
            ],
        )

    def result(self, stopped_at: float | None) -> Evaluation:
        """The `Evaluation` a local run would return (``stopped_at``: racing's bound)."""
        t, plan = self.tally, self.plan
        if t.completed == 0 and stopped_at is None:
            raise ConfigError("the dataset is empty")
        if plan.global_metric is not None:
            score, conservative = _global_scores(plan.global_metric, self.results)
        else:
            score, conservative = t.mean(), t.conservative_mean()
        self.outcomes.sort(key=lambda o: o.index)
        total = t.total if t.total is not None else t.completed
        return Evaluation(
            prompt_hash=plan.prompt.hash,
            score=score,
            conservative_score=conservative,
            total=total,
            completed=t.completed,
            scored=t.scored,
            errors=t.errors,
            calls=t.calls,
            cache_hits=t.cache_hits,
            retries=t.retries,
            usage=t.usage,
            wall_time=time.monotonic() - self.started,
            stopped_early=stopped_at is not None,
            upper_bound=stopped_at,
            must_beat=None,
            outcomes=tuple(self.outcomes),
        )


def _global_scores(
    metric: GlobalMetric, results: list[tuple[int, MetricResult | None, str]]
) -> tuple[float, float]:
    """(score over scored examples, conservative score), as `evaluate` computes them."""
    results.sort(key=lambda item: item[0])
    scored = [r for _, r, _ in results if r is not None]
    failed = [
        r if r is not None else MetricResult(0.0, f"error: {m}", {"error": True})
        for _, r, m in results
    ]
    score = _checked(metric, scored) if scored else math.nan
    return score, _checked(metric, failed)


def _checked(metric: GlobalMetric, results: list[MetricResult]) -> float:
    value = float(metric(results))
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise MetricError(f"the global metric returned {value!r}, not a score in [0, 1]")
    return value


# -- evaluate on the cluster ------------------------------------------------------------
def _job(
    cluster: RayCluster,
    plan: _Plan,
    *,
    metric_concurrency: int | None,
    on_error: Any,
    tally: Any,
) -> Job:
    endpoint = plan.endpoint
    return Job(
        job_id=uuid.uuid4().hex,
        prompt=plan.prompt,
        model=endpoint.model,
        name=endpoint.name,
        namespace=endpoint.cache_identity,
        retry=endpoint.retry,
        shares=plan.shares,
        metric=plan.runner.metric,
        metric_concurrency=metric_concurrency,
        metric_timeout=plan.runner.timeout,
        metric_threads=plan.metric_threads,
        on_error=on_error,
        cache=plan.cache_spec,
        budget=cluster.budget_for(endpoint),
        tally=tally,
        check_metric=plan.validate,
        secrets=known_secrets(),
    )


def _prepare(plan: _Plan, relay: _Relay | None) -> Callable[[Any], Awaitable[Any]] | None:
    """What the driver does to a batch before it goes out: check the rows of a plain
    iterable (a sequence was checked whole), seed a relayed cache."""
    checked = isinstance(plan.examples, Sequence | FileDataset) or not plan.validate

    async def prepare(batch: Any) -> Any:
        if not checked and isinstance(batch, ExampleBatch):
            for offset, example in enumerate(batch.examples):
                if not isinstance(example, Example):
                    where = f"example #{batch.start + offset}"
                    raise ConfigError(f"{where} is a {type(example).__name__}, not an Example")
                check_inputs(plan.prompt, example, f"example #{batch.start + offset}")
            if batch.seq == 0:
                await check_metric(plan.runner, batch.examples[0])
        if relay is not None and isinstance(batch, ExampleBatch):
            return await relay.seed(batch)
        return batch

    return None if checked and relay is None else prepare


async def evaluate_on(
    cluster: RayCluster,
    prompt: Prompt,
    examples: Iterable[Example],
    *,
    on_error: Any,
    must_beat: float | None,
    on_outcome: OutcomeCallback | None,
    keep_outcomes: bool,
    metric_concurrency: int | None,
    progress_interval: float,
    emitter: Emitter,
    meter: BudgetMeter | None,
    **checked: Any,
) -> Evaluation:
    """`evaluate` on ``cluster`` (the arguments as `engine.evaluate` takes them)."""
    if on_error not in ("record", "raise"):
        raise ConfigError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    laid = await plan(cluster, prompt, examples, must_beat=must_beat, emitter=emitter, **checked)
    tally = cluster.racing_tally() if must_beat is not None else None
    job = _job(cluster, laid, metric_concurrency=metric_concurrency, on_error=on_error, tally=tally)
    box = [put_job(job)]
    emitter.emit(
        "evaluation.started",
        total=laid.total,
        workers=len(laid.slots),
        must_beat=must_beat,
        endpoint=laid.endpoint.name,
        cluster=cluster.address,
    )
    try:
        if isinstance(examples, FileDataset) and laid.validate:
            laid = replace(laid, total=await check_file(cluster, laid, job.job_id, box))
        if tally is not None:
            assert must_beat is not None
            _check_racing(must_beat, laid.total, checked.get("global_metric"))
            await tally.start.remote(job.job_id, laid.total, must_beat)
        delivery = _Delivery(
            laid,
            on_outcome=on_outcome,
            keep_outcomes=keep_outcomes,
            meter=meter,
            relay=_Relay(laid) if laid.cache_spec.mode == "relay" else None,
            progress_interval=progress_interval,
        )
        await _evaluation_pass(cluster, laid, job.job_id, box, delivery, meter)
        bound = await tally.finish.remote(job.job_id) if tally is not None else None
        evaluation = replace(delivery.result(bound), must_beat=must_beat)
    except Exception as exc:
        emitter.emit("evaluation.failed", level="error", error=exc)
        raise
    finally:
        await cluster.finish(job.job_id, laid.slots, emitter)
        if tally is not None:
            tally.finish.remote(job.job_id)  # forgets it (already done on success)
    emitter.emit("evaluation.finished", **_summary(evaluation))
    return evaluation


async def _evaluation_pass(
    cluster: RayCluster,
    laid: _Plan,
    job_id: str,
    box: list[Any],
    delivery: _Delivery,
    meter: BudgetMeter | None,
) -> None:
    feeder: Feeder[Any, BatchResult] = Feeder(
        cluster,
        laid.slots,
        _batches(laid),
        lambda worker, batch: worker.run.remote(job_id, box, batch),
        delivery,
        events=laid.emitter,
        prepare=_prepare(laid, delivery.relay),
        before_send=meter.check if meter is not None else None,
    )
    await feeder.run()


def _summary(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "score": evaluation.score,
        "conservative_score": evaluation.conservative_score,
        "done": evaluation.completed,
        "total": evaluation.total,
        "errors": evaluation.errors,
        "calls": evaluation.calls,
        "cache_hits": evaluation.cache_hits,
        "retries": evaluation.retries,
        "tokens": evaluation.usage.total_tokens,
        "wall_time": round(evaluation.wall_time, 3),
        "stopped_early": evaluation.stopped_early,
        "upper_bound": evaluation.upper_bound,
    }
