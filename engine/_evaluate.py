"""`evaluate()`: stream a dataset through predict -> metric under an endpoint's limits.

A fixed pool of workers (an anyio task group, sized to the endpoint's concurrency)
pulls examples from one shared iterator and carries each from cache lookup to
prediction to metric as soon as it is ready.  There are no waves and no gather over
the dataset: at most ``concurrency`` examples are alive at once, whatever its size.

Every example ends with exactly one `Outcome`: a metric result, or an explicit error
with its cause.  Errors are never scored 0 in the reported score; decisions count them
as failures (`Evaluation.conservative_score`).

The work of one call is an `_EvaluationRun`, split the way a request is: cache and
prediction (`_predict`), the metric (`_score`), the error policy (`_predicted`,
`_scored`), accounting and racing (`_finish`), the worker topology (`_run`), and the
result (`_result`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import math
import time
from collections.abc import Awaitable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._aggregate import check_racing, evaluation_summary, global_scores, is_mean
from ._budget import BudgetMeter
from ._context import lend
from ._errors import (
    ConfigError,
    EngineError,
    MetricError,
    MetricTimeoutError,
    ProgramError,
    ProviderError,
    StrayCancellationError,
)
from ._events import Emitter, EventCallback
from ._options import ErrorPolicy, EvaluationBackend, EvaluationOptions, OutcomeCallback
from ._outcome import Evaluation, GlobalMetric, Outcome
from ._prompt import Prompt, canonical_json
from ._protocols import ChatModel, Metric
from ._scoring import MetricRunner, check_metric
from ._tally import Tally
from ._types import ErrorInfo, Example, MetricResult, ProgramCall
from .cache import Cache, CachedPrediction, metric_identity, request_hash
from .endpoint import Endpoint, Limits
from .program import Program, ProgramRunner, ProgramSetup, dry_run, program_setup
from .tracing import mark_example, run_span

__all__ = [
    "Evaluation",
    "GlobalMetric",
    "Outcome",
    "check_metric",
    "evaluate",
    "validate_examples",
]


def being_cancelled() -> bool:
    """Whether the current task is really being cancelled: a cancel scope around it was
    cancelled (the effective deadline is then -inf), or, on asyncio, someone called
    ``cancel()`` on it.  A ``CancelledError`` raised while neither holds is not ours."""
    if anyio.current_effective_deadline() == -math.inf:
        return True
    try:
        task = asyncio.current_task()
    except RuntimeError:  # not asyncio (trio): its Cancelled cannot be raised by hand
        return True
    return task is None or task.cancelling() > 0


async def _uncancelled(call: Awaitable[Any], who: str) -> Any:
    """Await ``call``; a stray ``CancelledError`` from it becomes `StrayCancellationError`,
    so it can only end its example, never silently its worker (anyio's task group takes
    a task ending in CancelledError for a cancellation and drops it without a word)."""
    try:
        return await call
    except anyio.get_cancelled_exc_class() as exc:
        if being_cancelled():
            raise
        raise StrayCancellationError(
            f"{who} raised CancelledError ({exc or 'no message'}) while the evaluation "
            "was not being cancelled"
        ) from exc


def _check_example(prompt: Prompt | Mapping[str, Prompt], example: object, index: int) -> Example:
    if not isinstance(example, Example):
        raise ConfigError(f"example #{index} is a {type(example).__name__}, not an engine.Example")
    if not isinstance(prompt, Prompt):
        return example  # a program's prompts: what each is rendered with is the program's
    names = set(example.inputs)
    missing = prompt.placeholders - names
    if missing:
        raise ConfigError(
            f"example #{index} (id={example.id!r}): inputs lack placeholder(s) {sorted(missing)}"
        )
    extra = names - prompt.placeholders
    if extra:
        raise ConfigError(
            f"example #{index} (id={example.id!r}): input(s) {sorted(extra)} are not "
            f"placeholders of the prompt (it uses {sorted(prompt.placeholders)})"
        )
    return example


def validate_examples(prompt: Prompt | Mapping[str, Prompt], examples: Sequence[Example]) -> None:
    """Check a dataset against a prompt before any call: non-empty, unique ids,
    inputs matching the placeholders (a program's prompts: no placeholder check, the
    program renders them).  Raises `ConfigError` naming the row."""
    if len(examples) == 0:
        raise ConfigError("the dataset is empty")
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        _check_example(prompt, example, index)
        first = seen.setdefault(example.id, index)
        if first != index:
            raise ConfigError(f"duplicate example id {example.id!r} at rows #{first} and #{index}")


@dataclass(frozen=True, slots=True)
class _Predicted:
    """An example between the prediction and the metric stage."""

    index: int
    example: Example
    prediction: CachedPrediction
    cached: bool
    trace: tuple[ProgramCall, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class _Settings:
    """Everything `evaluate` was asked, checked."""

    prompt: Prompt
    endpoint: Endpoint
    scorer: MetricRunner
    cache: Cache | None
    on_error: ErrorPolicy
    on_outcome: OutcomeCallback | None
    global_metric: GlobalMetric | None
    keep_outcomes: bool
    workers: int
    scorers: int
    progress_interval: float
    emitter: Emitter
    meter: BudgetMeter | None
    prevalidated: bool
    preflighted: bool
    program: ProgramSetup | None = None

    @property
    def identity(self) -> str:
        """The identity of the predictions: the prompt's hash, or the program's."""
        return self.program.identity if self.program is not None else self.prompt.hash


class _EvaluationRun:
    """One call of `evaluate`: its settings, its tally and its workers."""

    def __init__(self, settings: _Settings, examples: Iterable[Example], tally: Tally) -> None:
        self.s = settings
        self.tally = tally
        self.iterator: Iterator[tuple[int, Example]] = enumerate(examples)
        self.outcomes: list[Outcome] = []
        self.results: list[tuple[int, MetricResult | None, str]] = []  # for a global metric
        self.failure: BaseException | None = None
        self.pulled = 0  # examples taken from the iterator: each must end with one outcome
        self.preflighted = settings.preflighted
        self.params = settings.prompt.request_params()
        self.metric_id = self._metric_id()
        self.requests: dict[str, str] = {}  # format sent (canonical JSON) -> request hash
        self.started = time.monotonic()
        self.last_progress = self.started
        program = settings.program
        self.prompts = program.prompts if program is not None else settings.prompt
        self.runner = (
            ProgramRunner(
                settings.program,
                cache=settings.cache,
                meter=settings.meter,
                emitter=settings.emitter,
                paid=self.tally.paid,
            )
            if settings.program is not None
            else None
        )

    def _metric_id(self) -> str | None:
        cache, metric = self.s.cache, self.s.scorer.metric
        if cache is None:
            return None
        identity = metric_identity(metric)
        if identity is None and cache.first_uncacheable(metric):
            self.s.emitter.emit(
                "metric.uncacheable",
                level="warning",
                metric=getattr(metric, "__qualname__", type(metric).__qualname__),
                reason="its captured state has no canonical form; give it a cache_key "
                "attribute to cache its results",
            )
        return identity

    # -- the prediction ---------------------------------------------------------------
    def _request(self, sent: Any) -> str:
        """The request hash for a response format as sent (memoised per format)."""
        text = canonical_json(sent) if sent is not None else ""
        known = self.requests.get(text)
        if known is None:
            prompt, endpoint = self.s.prompt, self.s.endpoint
            known = request_hash(prompt.hash, endpoint.cache_identity, sent)
            self.requests[text] = known
        return known

    def _format_sent(self) -> Any:
        sent = self.s.endpoint.format_sent(self.s.prompt.response_format)
        return dict(sent) if sent is not None else None

    async def _predict(
        self, example: Example, trace: list[ProgramCall]
    ) -> tuple[CachedPrediction, bool]:
        s, tally = self.s, self.tally
        if self.runner is not None:  # a program: its lm calls go through the cache
            program: tuple[CachedPrediction, bool] = await _uncancelled(
                self.runner.predict(example, trace), "the program"
            )
            return program

        async def call() -> CachedPrediction:
            # rendered only on a miss: most of a training run's evaluations are hits
            messages = s.prompt.render(example.inputs)
            mark_example(example.id)
            try:
                result = await _uncancelled(
                    s.endpoint.complete(messages, self.params, events=s.emitter, meter=s.meter),
                    "the model",
                )
            except ProviderError as exc:
                tally.paid(exc.attempts, None, exc.timeouts, exc.hedges)
                raise
            completion = result.completion
            tally.paid(result.attempts, completion.usage, result.timeouts, result.hedges)
            sent = completion.sent_response_format
            answered = self._request(dict(sent)) if sent is not None else None
            return CachedPrediction(
                completion.text, completion.usage, answered, completion.finish_reason
            )

        if s.cache is None:
            return await call(), False
        return await s.cache.prediction(self._request(self._format_sent()), example, call)

    async def _predicted(self, index: int, example: Example) -> _Predicted | Outcome:
        """Stage 1: the prediction, or the outcome of an example that failed there."""
        calls: list[ProgramCall] = []  # a program's lm calls, as they end
        try:
            prediction, cached = await self._predict(example, calls)
        except ProviderError as exc:
            if exc.fatal or self.s.on_error == "raise":
                raise
            error = ErrorInfo.from_exception("predict", exc, exc.attempts)
            return Outcome(index, example.id, None, None, error, False, trace=tuple(calls))
        except (StrayCancellationError, ProgramError) as exc:
            if self.s.on_error == "raise":
                raise
            stage = "program" if isinstance(exc, ProgramError) else "predict"
            error = ErrorInfo.from_exception(stage, exc)
            return Outcome(index, example.id, None, None, error, False, trace=tuple(calls))
        return _Predicted(index, example, prediction, cached, tuple(calls))

    # -- the metric -------------------------------------------------------------------
    async def _score(self, example: Example, prediction: str) -> MetricResult:
        s = self.s

        async def score() -> MetricResult:
            result: MetricResult = await _uncancelled(s.scorer(example, prediction), "the metric")
            return result

        if s.cache is None or self.metric_id is None:
            return await score()
        result, _ = await s.cache.metric_result(
            self.metric_id, example, prediction, score, on_uncacheable=self._uncacheable_result
        )
        return result

    def _uncacheable_result(self, reason: str) -> None:
        """Say once per metric that some of its results are scored but not cached."""
        metric = self.s.scorer.metric
        if self.s.cache is not None and self.s.cache.first_uncacheable(metric):
            self.s.emitter.emit(
                "metric.uncacheable",
                level="warning",
                metric=getattr(metric, "__qualname__", type(metric).__qualname__),
                reason=f"{reason}; such results are scored afresh every time",
            )

    async def _scored(self, item: _Predicted) -> Outcome:
        """Stage 2: the metric on a prediction, or the error it ended with."""
        example, prediction = item.example, item.prediction
        cut = prediction.finish_reason == "length"
        try:
            result = await self._score(example, prediction.text)
        except MetricTimeoutError as exc:
            if self.s.on_error == "raise":
                raise
            error: ErrorInfo = ErrorInfo.from_exception("metric", exc)
        except MetricError:
            raise  # a score outside [0, 1] is a broken metric, not a bad example
        except EngineError as exc:
            if self.s.on_error == "raise" or (isinstance(exc, ProviderError) and exc.fatal):
                raise
            error = ErrorInfo.from_exception("metric", exc, getattr(exc, "attempts", 1))
        except Exception as exc:
            if self.s.on_error == "raise":
                raise MetricError(f"metric raised on example {example.id!r}: {exc}") from exc
            error = ErrorInfo.from_exception("metric", exc)
        else:
            return Outcome(
                item.index,
                example.id,
                prediction.text,
                result,
                None,
                item.cached,
                prediction.usage,
                item.trace,
                cut,
            )
        return Outcome(
            item.index,
            example.id,
            prediction.text,
            None,
            error,
            item.cached,
            prediction.usage,
            item.trace,
            cut,
        )

    # -- accounting -------------------------------------------------------------------
    async def _finish(self, item: _Predicted | Outcome, scope: anyio.CancelScope) -> bool:
        """Score, record and report one example; True when racing says stop."""
        outcome = item if isinstance(item, Outcome) else await self._scored(item)
        self.tally.add(outcome)
        if self.s.global_metric is not None:
            message = outcome.error.message if outcome.error is not None else ""
            self.results.append((outcome.index, outcome.result, message))
        if self.s.keep_outcomes:
            self.outcomes.append(outcome)
        self._progress()
        if self.s.on_outcome is not None:
            maybe = self.s.on_outcome(outcome)
            if inspect.isawaitable(maybe):
                await maybe
        if self.tally.cannot_win():
            self.tally.stopped_early = True
            scope.cancel()
            return True
        return False

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress < self.s.progress_interval:
            return
        self.last_progress = now
        self.s.emitter.emit(
            "evaluation.progress",
            level="debug",
            elapsed=round(now - self.started, 3),
            **self.tally.progress(),
        )

    def _fail(self, exc: Exception, scope: anyio.CancelScope) -> None:
        # Keep the first failure, stop everything, re-raise it unwrapped in run().
        if self.failure is None:
            self.failure = exc
        scope.cancel()

    # -- the workers ------------------------------------------------------------------
    async def _predictor(
        self, out: MemoryObjectSendStream[_Predicted | Outcome] | None, scope: anyio.CancelScope
    ) -> None:
        s = self.s
        try:
            for index, item in self.iterator:
                self.pulled += 1
                # A checkpoint every 8 examples: a model that answers without waiting
                # (an in-process one) would otherwise keep this worker from ever
                # yielding, starving the others, cancellation and the loop's timer
                # upkeep; one per example cost 4 us of the 40 (benchmarks/overhead.py).
                if not self.pulled & 7:
                    await anyio.lowlevel.checkpoint()
                example = item if s.prevalidated else _check_example(self.prompts, item, index)
                if not self.preflighted:
                    self.preflighted = True
                    if s.program is not None:
                        await dry_run(s.program, example)
                    await check_metric(s.scorer, example)
                done = await self._predicted(index, example)
                if out is not None:
                    await out.send(done)
                elif await self._finish(done, scope):
                    return
        except Exception as exc:
            self._fail(exc, scope)
        finally:
            if out is not None:
                out.close()

    async def _scorer(
        self, incoming: MemoryObjectReceiveStream[_Predicted | Outcome], scope: anyio.CancelScope
    ) -> None:
        async with incoming:
            try:
                async for item in incoming:
                    if await self._finish(item, scope):
                        return
            except Exception as exc:
                self._fail(exc, scope)

    async def run(self) -> Evaluation:
        s = self.s
        with run_span("evaluate", s.endpoint.name, **{"engine.prompt.hash": s.identity}):
            return await self._run()

    async def _run(self) -> Evaluation:
        s = self.s
        s.emitter.emit(
            "evaluation.started",
            total=self.tally.total,
            workers=s.workers,
            must_beat=float(self.tally.must_beat) if self.tally.must_beat is not None else None,
            endpoint=s.endpoint.name,
        )
        with lend(s.meter, s.emitter):
            if s.scorer.suspends is None and s.scorer.is_async and not self.preflighted:
                await self._check_first()  # whether the metric waits decides the topology
            if self.failure is None:
                async with anyio.create_task_group() as tg:
                    if not s.scorer.waits:
                        # A metric that cannot wait: score in the predictor, no hand-off.
                        for _ in range(s.workers):
                            tg.start_soon(self._predictor, None, tg.cancel_scope)
                    else:
                        self._start_pools(tg)
        if self.failure is not None:
            s.emitter.emit(
                "evaluation.failed", level="error", error=self.failure, done=self.tally.completed
            )
            raise self.failure
        if self.pulled == 0:
            raise ConfigError("the dataset is empty")
        self._check_complete()
        return self._result()

    async def _check_first(self) -> None:
        """Check the metric on a streamed dataset's first example before the workers
        start, as a sequence's is checked up front; the example goes back in line."""
        try:
            first = next(self.iterator, None)
            if first is None:
                return
            index, item = first
            await check_metric(self.s.scorer, _check_example(self.s.prompt, item, index))
        except Exception as exc:  # reported as the workers' failures are
            self.failure = exc
            self.pulled += 1  # taken, and it ends the run
            return
        self.preflighted = True
        self.iterator = itertools.chain([first], self.iterator)

    def _check_complete(self) -> None:
        """Raise unless every example taken ended with exactly one outcome (racing's cut
        excepted): a short result would be read as a score over fewer examples."""
        t = self.tally
        if t.stopped_early:
            return  # cut by racing: what is missing is reported as `lost`
        expected = t.total if t.total is not None else self.pulled
        kept = len(self.outcomes) if self.s.keep_outcomes else t.completed
        if t.completed != expected or self.pulled != expected or kept != expected:
            raise EngineError(
                f"internal error: {t.completed} outcomes for {expected} examples "
                f"({self.pulled} taken, {kept} kept); every example must end with exactly "
                "one outcome, so this evaluation is not returned short"
            )

    def _start_pools(self, tg: anyio.abc.TaskGroup) -> None:
        # Two pools joined by an unbuffered stream: a prediction goes to a free metric
        # worker, so a slow metric (a judge on its own endpoint, a thread) holds
        # predictions back only once every metric worker is busy, and predictions never
        # run far ahead of scoring (racing could save those).
        send, receive = anyio.create_memory_object_stream[_Predicted | Outcome](0)
        with send, receive:
            for _ in range(self.s.workers):
                tg.start_soon(self._predictor, send.clone(), tg.cancel_scope)
            for _ in range(self.s.scorers):
                tg.start_soon(self._scorer, receive.clone(), tg.cancel_scope)

    # -- the result -------------------------------------------------------------------
    def _result(self) -> Evaluation:
        t = self.tally
        wall = time.monotonic() - self.started
        if t.stopped_early and t.completed == t.total:
            # the examples in flight when racing cut it finished anyway: a full evaluation
            t.stopped_early, t.upper_bound = False, None
        if self.s.global_metric is not None:
            score, conservative = global_scores(self.s.global_metric, self.results)
        else:
            # with nothing scored there is no score: NaN, never a silent 0
            score, conservative = t.mean(), t.conservative_mean()
        self.outcomes.sort(key=lambda o: o.index)
        evaluation = Evaluation(
            prompt_hash=self.s.identity,
            score=score,
            conservative_score=conservative,
            **t.counts(),
            wall_time=wall,
            stopped_early=t.stopped_early,
            upper_bound=float(t.upper_bound) if t.upper_bound is not None else None,
            must_beat=float(t.must_beat) if t.must_beat is not None else None,
            outcomes=tuple(self.outcomes),
        )
        self.s.emitter.emit("evaluation.finished", **evaluation_summary(evaluation))
        return evaluation


async def evaluate(
    prompt: Prompt | Mapping[str, Prompt],
    examples: Iterable[Example],
    *,
    model: ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint],
    metric: Metric,
    cache: Cache | None = None,
    limits: Limits | None = None,
    on_error: ErrorPolicy = "record",
    must_beat: float | None = None,
    on_event: EventCallback | None = None,
    on_outcome: OutcomeCallback | None = None,
    global_metric: GlobalMetric | None = None,
    keep_outcomes: bool = True,
    concurrency: int | None = None,
    metric_concurrency: int | None = None,
    metric_timeout: float | None = 60.0,
    metric_threads: int = 16,
    progress_interval: float = 0.5,
    events: Emitter | None = None,
    meter: BudgetMeter | None = None,
    validate: bool = True,
    cluster: EvaluationBackend | None = None,
    program: Program | ProgramSetup | None = None,
) -> Evaluation:
    """Score ``prompt`` on ``examples`` with ``metric``.

    Parameters:
        prompt: the prompt to evaluate; with ``program``, a mapping of prompt name ->
            `Prompt` (the program's prompts).
        examples: a sequence (validated whole before the first call) or any iterable
            (validated row by row as it streams; duplicate ids are not detected).
        model: a `ChatModel` (its shared `Endpoint` is used, see `Endpoint.of`), or an
            `Endpoint`; with ``program``, also a mapping of prompt name -> model.
        metric: ``(example, prediction) -> MetricResult | float``, sync or async.
            A synchronous metric runs on the loop until a call takes over 1 ms, then
            in worker threads (``inline = True/False`` on the metric decides instead).
        cache: a `Cache`; ``None`` disables caching.
        limits: limits for a bare ``model`` (an `Endpoint` carries its own).
        on_error: ``"record"`` keeps failed examples as error outcomes (left out of
            ``score``, failures in ``conservative_score``); ``"raise"`` fails the
            evaluation on the first one.  Fatal errors (bad credentials, exhausted
            quota, an unreachable endpoint) and broken metrics always raise.
        must_beat: exact early stopping: stop and cancel in-flight calls as soon as
            the conservative mean cannot exceed this score (needs a sized dataset and
            the mean as global metric; the decision equals a full evaluation's).
        on_event: callback for progress events (also logged through structlog).
        on_outcome: called (or awaited) with each `Outcome` as it completes.
        global_metric: aggregate over the per-example results (dataset order);
            default the mean.
        keep_outcomes: keep every `Outcome` in the result; turn off for flat memory
            on huge datasets (stream them with ``on_outcome``).
        concurrency: prediction workers; defaults to the endpoint's concurrency limit.
        metric_concurrency: metric workers for metrics that wait (async or threaded);
            default ``4 * concurrency``.
        metric_timeout: seconds one metric call may take before its example gets a
            `MetricError` outcome (``None``: unbounded).
        metric_threads: worker threads for synchronous metrics that are not inline (one
            measured CPU-bound uses at most one per core plus one).
        progress_interval: seconds between ``evaluation.progress`` events.
        meter: a `BudgetMeter` charged for every call, a metric's own calls included.
        validate: check the dataset and the metric before the first call; callers
            that already did (the trainer, once per run) turn it off.
        cluster: an `EvaluationBackend` such as `engine.cluster.RayCluster`: run on
            its workers instead of here (same arguments, same result).
        program: ``async def program(lm, example) -> answer``: the prediction of an
            example is the program's answer; ``await lm(name, **variables)`` renders
            prompt ``name`` and sends it through its endpoint, the budget and the cache
            (each call cached by what was sent, so an unchanged stage is free).  Its
            calls are the outcome's ``trace``; a program that raises gives that example
            an error outcome (stage ``"program"``).  With ``validate``, a dry pass runs
            it on the first example with a placeholder ``lm`` that pays nothing: an
            unknown prompt name or a missing variable is a `ConfigError` before any
            paid call.  ``Evaluation.prompt_hash`` is then the program's identity (its
            code, every prompt, every endpoint).  On a cluster the program must be
            importable by module path on the workers (``module:function``), as a
            metric's code is; its cache must be one every worker opens
            (``Cache(PostgresStore(url))``) or none.
    """
    setup = _program_of(prompt, model, program, limits)
    if setup is not None:  # the first prompt and endpoint name the run and size it
        prompt, model = next(iter(setup.prompts.values())), setup.first
    assert isinstance(prompt, Prompt) and not isinstance(model, Mapping)
    options = EvaluationOptions(
        model=model, metric=metric, cache=cache, limits=limits, on_error=on_error,
        must_beat=must_beat, on_event=on_event, on_outcome=on_outcome,
        global_metric=global_metric, keep_outcomes=keep_outcomes, concurrency=concurrency,
        metric_concurrency=metric_concurrency, metric_timeout=metric_timeout,
        metric_threads=metric_threads, progress_interval=progress_interval, events=events,
        meter=meter, validate=validate, program=setup,
    )  # fmt: skip
    if cluster is not None:
        # Scale-out wraps the core: the cluster's workers run this same function.
        return await cluster.run_evaluation(prompt, examples, options)
    settings, total = await _settle(prompt, examples, options, setup)
    return await _EvaluationRun(settings, examples, Tally(total, must_beat)).run()


def _program_of(
    prompt: Prompt | Mapping[str, Prompt],
    model: ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint],
    program: Program | ProgramSetup | None,
    limits: Limits | None,
) -> ProgramSetup | None:
    """The checked program, or None for one prompt (then ``prompt`` must be one)."""
    if program is None:
        if not isinstance(prompt, Prompt):
            raise ConfigError("a mapping of prompts needs program= (the code that calls them)")
        if isinstance(model, Mapping):
            raise ConfigError("model= as a mapping of prompt names needs program=")
        return None
    if isinstance(program, ProgramSetup):  # the trainer's, checked once per run
        return program.with_prompts(prompt) if isinstance(prompt, Mapping) else program
    if isinstance(prompt, Prompt):
        raise ConfigError("program= needs a mapping of prompt name -> Prompt")
    return program_setup(prompt, program, model, limits=limits)


async def _settle(
    prompt: Prompt,
    examples: Iterable[Example],
    options: EvaluationOptions,
    program: ProgramSetup | None = None,
) -> tuple[_Settings, int | None]:
    """Check every argument of `evaluate` (and the data and metric, once) before any
    call is made; return the settings of the run and the dataset's size if known."""
    o = options
    endpoint = Endpoint.of(o.model, limits=o.limits)
    total = len(examples) if isinstance(examples, Sized) else None
    if o.must_beat is not None:
        check_racing(o.must_beat, total, o.global_metric)
    runner = MetricRunner(o.metric, timeout=o.metric_timeout, threads=o.metric_threads)
    prevalidated = isinstance(examples, Sequence)
    if prevalidated and o.validate:
        validate_examples(program.prompts if program else prompt, examples)  # type: ignore[arg-type]
        if program is not None:
            await dry_run(program, examples[0])  # type: ignore[index]
        await check_metric(runner, examples[0])  # type: ignore[index]
    workers = o.concurrency if o.concurrency is not None else endpoint.limits.concurrency
    if program is not None and o.concurrency is None:
        workers = max(e.limits.concurrency for e in program.endpoints.values())
    if workers < 1:
        raise ConfigError("concurrency must be at least 1")
    if total is not None:
        workers = min(workers, max(total, 1))
    # waiting metrics may queue on their own endpoint or threads: give them room
    scorers = o.metric_concurrency if o.metric_concurrency is not None else 4 * workers
    if scorers < 1:
        raise ConfigError("metric_concurrency must be at least 1")
    global_metric = o.global_metric
    settings = _Settings(
        prompt=prompt,
        endpoint=endpoint,
        scorer=runner,
        cache=o.cache,
        on_error=o.on_error,
        on_outcome=o.on_outcome,
        global_metric=None if global_metric is None or is_mean(global_metric) else global_metric,
        keep_outcomes=o.keep_outcomes,
        workers=workers,
        scorers=scorers,
        progress_interval=o.progress_interval,
        emitter=o.emitter(prompt),
        meter=o.meter,
        prevalidated=prevalidated,
        preflighted=prevalidated or not o.validate,
        program=program,
    )
    return settings, total
