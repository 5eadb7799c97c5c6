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

import contextlib
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, contextmanager
from dataclasses import replace
from typing import Any, Protocol

import anyio

from .._aggregate import check_racing, evaluation_summary
from .._budget import BudgetMeter
from .._errors import ConfigError, DataError
from .._events import Emitter
from .._options import EvaluationOptions
from .._outcome import Evaluation
from .._prompt import Prompt
from .._redact import known_secrets
from .._scoring import check_metric
from .._types import Example, Usage
from ..endpoint import _SHARED_ATTRIBUTE, Endpoint
from ..program import dry_run
from ..tracing import run_span, trace_carrier
from ._delivery import Delivery, Relay
from ._dispatch import Feeder
from ._leased import unleased
from ._plan import Plan, plan
from ._ray import ray_module
from ._source import ExampleBatch, FileBatch, FileDataset, example_batches, file_batches
from ._spend import Allowance, Spent
from ._worker import BatchResult, CheckResult, Job, StageEndpoint, check_inputs

__all__ = ["WorkerPool", "evaluate_on"]


class WorkerPool(Protocol):
    """What an evaluation needs of the cluster (`RayCluster` is one): its workers and
    the actors every evaluation shares.  A protocol, so this module never imports the
    cluster that calls it."""

    address: str
    batch_size: int | None

    @property
    def workers(self) -> int: ...
    def handle(self, slot: int) -> Any: ...
    async def replace(self, slot: int, dead: Any) -> None: ...
    def budget_for(self, endpoint: Endpoint) -> Any: ...
    def attached(self, endpoint: Endpoint) -> AbstractAsyncContextManager[Any]: ...
    def racing_tally(self) -> Any: ...
    def spend_ledger(self) -> Any: ...
    async def finish(self, job_id: str, slots: Iterable[int], events: Emitter) -> None: ...


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
    with contextlib.ExitStack() as detached:
        for model in [job.model, *(stage.model for stage in job.stages)]:
            detached.enter_context(_detached(model))
        try:
            return ray.put(job)
        except Exception as exc:
            raise ConfigError(
                f"the model, metric, prompt and program travel to cluster workers by "
                f"pickling, and this one cannot be pickled: {type(exc).__name__}: {exc}"
            ) from exc


async def check_file(cluster: WorkerPool, plan: Plan, job_id: str, box: list[Any]) -> int:
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


def _batches(plan: Plan) -> Iterator[ExampleBatch | FileBatch]:
    if isinstance(plan.examples, FileDataset):
        return file_batches(plan.examples, plan.batch_size)
    return example_batches(plan.examples, plan.batch_size)


def _job(
    cluster: WorkerPool, plan: Plan, options: EvaluationOptions, *, tally: Any, ledger: Any
) -> Job:
    endpoint = plan.endpoint
    return Job(
        job_id=uuid.uuid4().hex,
        prompt=plan.prompt,
        model=unleased(endpoint.model),
        name=endpoint.name,
        namespace=endpoint.cache_identity,
        retry=endpoint.retry,
        shares=plan.shares,
        metric=plan.runner.metric,
        metric_concurrency=options.metric_concurrency,
        metric_timeout=plan.runner.timeout,
        metric_threads=plan.metric_threads,
        on_error=options.on_error,
        cache=plan.cache_spec,
        budget=cluster.budget_for(endpoint),
        limits=endpoint.limits,
        tally=tally,
        ledger=ledger,
        check_metric=plan.validate,
        secrets=known_secrets(),
        trace_context=trace_carrier(),
        **_program_parts(cluster, plan),
    )


def _endpoints(plan: Plan) -> list[Endpoint]:
    """The distinct endpoints the evaluation calls (a program's prompts may share one)."""
    if plan.program is None:
        return [plan.endpoint]
    return list({id(e): e for e in plan.program.endpoints.values()}.values())


def _program_parts(cluster: WorkerPool, plan: Plan) -> dict[str, Any]:
    """A program's part of the job: the callable, its prompts, each prompt's endpoint."""
    program = plan.program
    if program is None:
        return {}
    endpoints = _endpoints(plan)
    index = {id(e): i for i, e in enumerate(endpoints)}
    stages = tuple(
        StageEndpoint(
            model=unleased(e.model),
            name=e.name,
            namespace=e.cache_identity,
            retry=e.retry,
            budget=cluster.budget_for(e),
            shares=plan.stage_shares(e),
            limits=e.limits,
        )
        for e in endpoints
    )
    return {
        "program": program.program,
        "prompts": dict(program.prompts),
        "stages": stages,
        "stage_of": {name: index[id(e)] for name, e in program.endpoints.items()},
    }


def _prepare(plan: Plan, relay: Relay | None) -> Callable[[Any], Awaitable[Any]] | None:
    """What the driver does to a batch before it goes out: check the rows of a plain
    iterable (a sequence was checked whole), seed a relayed cache."""
    checked = isinstance(plan.examples, Sequence | FileDataset) or not plan.validate
    program = plan.program

    async def prepare(batch: Any) -> Any:
        if not checked and isinstance(batch, ExampleBatch):
            for offset, example in enumerate(batch.examples):
                if not isinstance(example, Example):
                    where = f"example #{batch.start + offset}"
                    raise ConfigError(f"{where} is a {type(example).__name__}, not an Example")
                if program is None:  # a program's prompts are rendered by its code
                    check_inputs(plan.prompt, example, f"example #{batch.start + offset}")
            if batch.seq == 0:
                if program is not None:
                    await dry_run(program, batch.examples[0])
                await check_metric(plan.runner, batch.examples[0])
        if relay is not None and isinstance(batch, ExampleBatch):
            return await relay.seed(batch)
        return batch

    return None if checked and relay is None else prepare


def _models(plan: Plan) -> frozenset[str]:
    """The model names the evaluation's calls are charged to (a program's prompts'
    may differ: then the run's money cap, priced per model, cannot be leased as one)."""
    if plan.program is None:
        return frozenset([plan.prompt.model])
    return frozenset(p.model for p in plan.program.prompts.values())


async def evaluate_on(
    cluster: WorkerPool, prompt: Prompt, examples: Iterable[Example], options: EvaluationOptions
) -> Evaluation:
    """`evaluate` on ``cluster``, in its ``evaluate`` span (the workers' spans join it)."""
    name = getattr(options.model, "name", None)
    with run_span("evaluate", name, **{"engine.cluster": cluster.address}):
        laid = await plan(
            prompt, examples, options, workers=cluster.workers, batch_size=cluster.batch_size
        )
        async with AsyncExitStack() as stack:
            for endpoint in _endpoints(laid):  # the driver's calls share each one's rate
                await stack.enter_async_context(cluster.attached(endpoint))
            return await _evaluate_planned(cluster, laid, options)


async def _evaluate_planned(
    cluster: WorkerPool, laid: Plan, options: EvaluationOptions
) -> Evaluation:
    """The evaluation of ``laid`` on the pool: ship the job, feed, deliver, settle."""
    examples, emitter = laid.examples, laid.emitter
    must_beat, meter = options.must_beat, options.meter
    tally = cluster.racing_tally() if must_beat is not None else None
    ledger = cluster.spend_ledger() if meter is not None else None
    job = _job(cluster, laid, options, tally=tally, ledger=ledger)
    box = [put_job(job)]
    models = _models(laid)
    if meter is not None and meter.budget.max_cost is not None and len(models) > 1:
        raise ConfigError(
            f"a money cap on a cluster is leased at one model's price; this program's "
            f"prompts use {sorted(models)}: cap calls or tokens, or run it locally"
        )
    if ledger is not None and meter is not None:  # no call without the run's permit
        await ledger.open.remote(job.job_id, Allowance.of(meter, min(models)))
    delivery: Delivery | None = None
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
            check_racing(must_beat, laid.total, options.global_metric)
            await tally.start.remote(job.job_id, laid.total, must_beat)
        delivery = Delivery(
            laid,
            models=models,
            on_outcome=options.on_outcome,
            keep_outcomes=options.keep_outcomes,
            meter=meter,
            relay=Relay(laid) if laid.cache_spec.mode == "relay" else None,
            progress_interval=options.progress_interval,
        )
        await _evaluation_pass(cluster, laid, job.job_id, box, delivery, meter, tally)
        bound = await tally.finish.remote(job.job_id) if tally is not None else None
        evaluation = replace(delivery.result(bound), must_beat=must_beat)
    except Exception as exc:
        emitter.emit("evaluation.failed", level="error", error=exc)
        raise
    finally:
        await cluster.finish(job.job_id, laid.slots, emitter)
        if tally is not None:
            tally.finish.remote(job.job_id)  # forgets it (already done on success)
        if ledger is not None and meter is not None:
            await _settle(ledger, job.job_id, meter, min(models), delivery)
    emitter.emit("evaluation.finished", **evaluation_summary(evaluation))
    return evaluation


async def _settle(
    ledger: Any, job_id: str, meter: BudgetMeter, model: str, delivery: Delivery | None
) -> None:
    """Charge ``meter`` what the ledger knows was paid beyond the delivered batches (the
    calls of workers that died, of batches a failure stopped)."""
    with anyio.CancelScope(shield=True):
        spent: Spent | None = await ledger.settle.remote(job_id)
    if spent is None:
        return
    calls, usage = (delivery.model_calls, delivery.model_usage) if delivery else (0, Usage())
    for _ in range(spent.calls - calls):
        meter.charge_call(model)
    extra = Usage(
        max(0, spent.usage.prompt_tokens - usage.prompt_tokens),
        max(0, spent.usage.completion_tokens - usage.completion_tokens),
    )
    if extra.total_tokens:
        meter.charge_usage(model, extra)


async def _evaluation_pass(
    cluster: WorkerPool,
    laid: Plan,
    job_id: str,
    box: list[Any],
    delivery: Delivery,
    meter: BudgetMeter | None,
    tally: Any,
) -> None:
    async def forget(batch: Any) -> None:  # racing counts the run that is delivered
        await tally.forget.remote(job_id, batch.seq)

    rerun = forget if tally is not None else None
    feeder: Feeder[Any, BatchResult] = Feeder(
        cluster,
        laid.slots,
        _batches(laid),
        lambda worker, batch: worker.run.remote(job_id, box, batch),
        delivery,
        events=laid.emitter,
        prepare=_prepare(laid, delivery.relay),
        before_send=meter.check if meter is not None else None,
        rerun=rerun,
    )
    delivery.running = feeder.running  # the progress events show what each worker holds
    await feeder.run()
