"""`evaluate()`: stream a dataset through predict -> metric under an endpoint's limits.

A fixed pool of workers (an anyio task group, sized to the endpoint's concurrency)
pulls examples from one shared iterator and carries each from cache lookup to
prediction to metric as soon as it is ready.  There are no waves and no gather over
the dataset: at most ``concurrency`` examples are alive at once, whatever its size.

Every example ends with exactly one `Outcome`: a metric result, or an explicit error
with its cause.  Errors are never scored 0; they are left out of the mean and counted.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence, Sized
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ._budget import BudgetMeter
from ._cache import Cache, CachedPrediction, metric_identity
from ._endpoint import Endpoint
from ._errors import ConfigError, EngineError, MetricError, ProviderError
from ._events import Emitter, EventCallback
from ._limits import Limits
from ._prompt import Prompt, render_value
from ._protocols import ChatModel, Metric, MetricReturn
from ._types import Example, MetricResult, OutcomeError, Usage, as_score

__all__ = ["Evaluation", "GlobalMetric", "Outcome", "check_metric", "evaluate", "validate_examples"]

ErrorPolicy = Literal["record", "raise"]
GlobalMetric = Callable[[Sequence[MetricResult]], float]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one example: a metric result, or an error; never both."""

    index: int
    example_id: str
    prediction: str | None
    result: MetricResult | None
    error: OutcomeError | None
    cached: bool
    usage: Usage = field(default_factory=Usage)

    @property
    def score(self) -> float | None:
        return self.result.score if self.result is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.example_id,
            "prediction": self.prediction,
            "result": self.result.to_dict() if self.result is not None else None,
            "error": (
                {
                    "stage": self.error.stage,
                    "type": self.error.type,
                    "message": self.error.message,
                    "attempts": self.error.attempts,
                }
                if self.error is not None
                else None
            ),
            "cached": self.cached,
            "usage": [self.usage.prompt_tokens, self.usage.completion_tokens],
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The result of `evaluate`.

    ``score`` is the global metric over the scored examples (the mean by default);
    errored examples are excluded from it and counted in ``errors``.  When racing cut
    the evaluation (``stopped_early``), ``score`` is the mean over what completed and
    ``upper_bound`` the best the full evaluation could have reached (``<= must_beat``).
    """

    prompt_hash: str
    score: float
    total: int
    completed: int
    scored: int
    errors: int
    calls: int
    cache_hits: int
    retries: int
    usage: Usage
    wall_time: float
    stopped_early: bool = False
    upper_bound: float | None = None
    must_beat: float | None = None
    outcomes: tuple[Outcome, ...] = field(default=(), repr=False)

    @property
    def lost(self) -> int:
        """Examples with no outcome at all; always 0 unless racing cut the run."""
        return self.total - self.completed

    def to_dict(self, *, outcomes: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "prompt_hash",
                "score",
                "total",
                "completed",
                "scored",
                "errors",
                "calls",
                "cache_hits",
                "retries",
                "wall_time",
                "stopped_early",
                "upper_bound",
                "must_beat",
            )
        }
        data["usage"] = [self.usage.prompt_tokens, self.usage.completion_tokens]
        if outcomes:
            data["outcomes"] = [o.to_dict() for o in self.outcomes]
        return data


def _as_result(value: MetricReturn, where: str) -> MetricResult:
    if isinstance(value, MetricResult):
        return value
    score = as_score(value)  # NumPy scalars too (numpy.bool_ is not a bool)
    if score is not None:
        try:
            return MetricResult(score)
        except MetricError as exc:
            raise MetricError(f"{where}: {exc}") from None
    raise MetricError(
        f"{where}: a metric must return a MetricResult or a number in [0, 1], "
        f"got {type(value).__name__}"
    )


async def _call_metric(metric: Metric, example: Example, prediction: str) -> MetricResult:
    value = metric(example, prediction)
    if inspect.isawaitable(value):
        value = await value
    return _as_result(value, f"metric on example {example.id!r}")


def _check_example(prompt: Prompt, example: object, index: int) -> Example:
    if not isinstance(example, Example):
        raise ConfigError(f"example #{index} is a {type(example).__name__}, not an engine.Example")
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


def validate_examples(prompt: Prompt, examples: Sequence[Example]) -> None:
    """Check a dataset against a prompt before any call: non-empty, unique ids,
    inputs matching the placeholders.  Raises `ConfigError` naming the row."""
    if len(examples) == 0:
        raise ConfigError("the dataset is empty")
    seen: dict[str, int] = {}
    for index, example in enumerate(examples):
        _check_example(prompt, example, index)
        first = seen.setdefault(example.id, index)
        if first != index:
            raise ConfigError(f"duplicate example id {example.id!r} at rows #{first} and #{index}")


def _is_async(metric: Metric) -> bool:
    call = getattr(metric, "__call__", None)  # noqa: B004 - callable instances
    return inspect.iscoroutinefunction(metric) or inspect.iscoroutinefunction(call)


async def check_metric(metric: Metric, example: Example) -> None:
    """Run the metric once on the expected answer, so a broken metric fails before
    anything is paid.  Metrics that cost calls opt out with ``preflight = False``."""
    if getattr(metric, "preflight", True) is False:
        return
    prediction = "" if example.expected is None else render_value(example.expected)
    try:
        await _call_metric(metric, example, prediction)
    except MetricError as exc:
        raise MetricError(f"metric check before the first call failed: {exc}") from exc
    except Exception as exc:
        raise MetricError(
            f"metric raised {type(exc).__name__} on example {example.id!r} with its expected "
            f"answer as the prediction (checked before the first call): {exc}"
        ) from exc


@dataclass(frozen=True, slots=True)
class _Predicted:
    """An example between the prediction and the metric stage."""

    index: int
    example: Example
    prediction: CachedPrediction
    cached: bool


class _Run:
    """The mutable state of one evaluation (owned by its workers, one event loop)."""

    def __init__(self, total: int | None, must_beat: float | None) -> None:
        self.total = total
        self.must_beat = Fraction(must_beat) if must_beat is not None else None
        self.completed = 0
        self.scored = 0
        self.errors = 0
        self.score_sum = Fraction(0)  # exact, so the result is independent of order
        self.calls = 0
        self.cache_hits = 0
        self.retries = 0
        self.usage = Usage()
        self.stopped_early = False
        self.upper_bound: Fraction | None = None
        self.failure: BaseException | None = None

    def cannot_win(self) -> bool:
        """Exact racing test: with every remaining example at 1.0, still not above?"""
        if self.must_beat is None or self.total is None:
            return False
        denominator = self.total - self.errors
        if denominator <= 0:
            bound = Fraction(0)
        else:
            bound = (self.score_sum + (self.total - self.completed)) / denominator
        if bound <= self.must_beat:
            self.upper_bound = bound
            return True
        return False


async def evaluate(
    prompt: Prompt,
    examples: Iterable[Example],
    *,
    model: ChatModel | Endpoint,
    metric: Metric,
    cache: Cache | None = None,
    limits: Limits | None = None,
    on_error: ErrorPolicy = "record",
    must_beat: float | None = None,
    on_event: EventCallback | None = None,
    on_outcome: Callable[[Outcome], Awaitable[None] | None] | None = None,
    global_metric: GlobalMetric | None = None,
    keep_outcomes: bool = True,
    concurrency: int | None = None,
    metric_concurrency: int | None = None,
    progress_interval: float = 0.5,
    events: Emitter | None = None,
    meter: BudgetMeter | None = None,
    validate: bool = True,
) -> Evaluation:
    """Score ``prompt`` on ``examples`` with ``metric``.

    Parameters:
        prompt: the prompt to evaluate.
        examples: a sequence (validated whole before the first call) or any iterable
            (validated row by row as it streams; duplicate ids are not detected).
        model: a `ChatModel`, or an `Endpoint` to share limits with other work.
        metric: ``(example, prediction) -> MetricResult | float``, sync or async.
        cache: a `Cache`; ``None`` disables caching.
        limits: limits for a bare ``model`` (an `Endpoint` carries its own).
        on_error: ``"record"`` keeps failed examples as error outcomes (excluded from
            the score); ``"raise"`` fails the evaluation on the first one.  Bad
            credentials and broken metrics always raise.
        must_beat: exact early stopping: stop and cancel in-flight calls as soon as
            the mean cannot exceed this score (needs a sized dataset and the default
            mean; the accept/reject decision is the same as a full evaluation).
        on_event: callback for progress events (also logged through structlog).
        on_outcome: called with each `Outcome` as it completes (for streaming output).
        global_metric: aggregate over the per-example results; default mean.
        keep_outcomes: keep every `Outcome` in the result; turn off for flat memory
            on huge datasets (stream them with ``on_outcome``).
        concurrency: prediction workers; defaults to the endpoint's concurrency limit.
        metric_concurrency: metric workers for async metrics; default ``4 * concurrency``
            (they only wait; the metric's own endpoint limits its calls).  Predictions
            and metrics run in separate pools, so a slow metric does not hold back
            predictions until all metric workers are busy.
        progress_interval: seconds between ``evaluation.progress`` events.
        meter: a `BudgetMeter` charged for every call (the trainer passes its own).
        validate: check the dataset and the metric before the first call; callers
            that already did (the trainer, once per run) turn it off so repeated
            evaluations of the same data do not repeat the work.
    """
    if on_error not in ("record", "raise"):
        raise ConfigError(f"on_error must be 'record' or 'raise', got {on_error!r}")
    endpoint = Endpoint.of(model, limits=limits)
    total = len(examples) if isinstance(examples, Sized) else None
    if must_beat is not None:
        if global_metric is not None:
            raise ConfigError("must_beat (racing) needs the mean; a global metric turns it off")
        if total is None:
            raise ConfigError("must_beat (racing) needs a dataset with a known length")
        if not 0.0 <= must_beat <= 1.0 or math.isnan(must_beat):
            raise ConfigError(f"must_beat must be in [0, 1], got {must_beat!r}")
    prevalidated = isinstance(examples, Sequence)
    if prevalidated and validate:
        validate_examples(prompt, examples)  # type: ignore[arg-type]
        await check_metric(metric, examples[0])  # type: ignore[index]
    workers = concurrency if concurrency is not None else endpoint.limits.concurrency
    if workers < 1:
        raise ConfigError("concurrency must be at least 1")
    if total is not None:
        workers = min(workers, max(total, 1))
    # async metrics may wait on their own endpoint: give them room to queue up there
    scorers = metric_concurrency if metric_concurrency is not None else 4 * workers
    if scorers < 1:
        raise ConfigError("metric_concurrency must be at least 1")

    metric_id = metric_identity(metric) if cache is not None else ""
    params: dict[str, Any] = {"model": prompt.model, **prompt.params}
    if prompt.response_format is not None:
        params["response_format"] = dict(prompt.response_format)
    emitter = (events or Emitter(on_event)).bind(prompt=prompt.hash[:12])
    run = _Run(total, must_beat)
    results: list[MetricResult] | None = [] if global_metric is not None else None
    outcomes: list[Outcome] = []
    iterator = enumerate(examples)
    started = time.monotonic()
    last_progress = started
    preflighted = prevalidated or not validate

    async def predict(example: Example) -> tuple[CachedPrediction, bool]:
        async def call() -> CachedPrediction:
            # rendered only on a miss: most of a training run's evaluations are hits
            messages = prompt.render(example.inputs)
            try:
                result = await endpoint.complete(messages, params, events=emitter, meter=meter)
            except ProviderError as exc:
                run.calls += exc.attempts
                run.retries += exc.attempts - 1
                raise
            run.calls += result.attempts
            run.retries += result.attempts - 1
            usage = result.completion.usage
            run.usage = run.usage + usage
            return CachedPrediction(result.completion.text, usage)

        if cache is None:
            return await call(), False
        return await cache.prediction(prompt.hash, example, call)

    async def score(example: Example, prediction: str) -> MetricResult:
        if cache is None:
            return await _call_metric(metric, example, prediction)
        result, _ = await cache.metric_result(
            metric_id, prompt.hash, example.id, lambda: _call_metric(metric, example, prediction)
        )
        return result

    async def predicted(index: int, example: Example) -> _Predicted | Outcome:
        """Stage 1: the prediction, or the outcome of an example that failed there."""
        try:
            prediction, cached = await predict(example)
        except ProviderError as exc:
            if exc.fatal or on_error == "raise":
                raise
            return Outcome(
                index,
                example.id,
                None,
                None,
                OutcomeError.from_exception("predict", exc, exc.attempts),
                False,
            )
        return _Predicted(index, example, prediction, cached)

    async def scored(item: _Predicted) -> Outcome:
        """Stage 2: the metric on a prediction."""
        index, example, prediction, cached = item.index, item.example, item.prediction, item.cached
        try:
            result = await score(example, prediction.text)
        except MetricError:
            raise  # a score outside [0, 1] is a broken metric, not a bad example
        except EngineError as exc:
            if on_error == "raise" or (isinstance(exc, ProviderError) and exc.fatal):
                raise
            error = OutcomeError.from_exception("metric", exc, getattr(exc, "attempts", 1))
            return Outcome(
                index, example.id, prediction.text, None, error, cached, prediction.usage
            )
        except Exception as exc:
            if on_error == "raise":
                raise MetricError(f"metric raised on example {example.id!r}: {exc}") from exc
            error = OutcomeError.from_exception("metric", exc)
            return Outcome(
                index, example.id, prediction.text, None, error, cached, prediction.usage
            )
        return Outcome(index, example.id, prediction.text, result, None, cached, prediction.usage)

    def record(outcome: Outcome) -> None:
        nonlocal last_progress
        run.completed += 1
        if outcome.cached:
            run.cache_hits += 1
        if outcome.result is None:
            run.errors += 1
        else:
            run.scored += 1
            run.score_sum += Fraction(outcome.result.score)
            if results is not None:
                results.append(outcome.result)
        if keep_outcomes:
            outcomes.append(outcome)
        now = time.monotonic()
        if now - last_progress >= progress_interval:
            last_progress = now
            emitter.emit(
                "evaluation.progress",
                level="debug",
                done=run.completed,
                total=run.total,
                calls=run.calls,
                cache_hits=run.cache_hits,
                errors=run.errors,
                retries=run.retries,
                tokens=run.usage.total_tokens,
                elapsed=round(now - started, 3),
            )

    def fail(exc: Exception, scope: anyio.CancelScope) -> None:
        # Keep the first failure, stop everything, re-raise it unwrapped below.
        if run.failure is None:
            run.failure = exc
        scope.cancel()

    async def finish(item: _Predicted | Outcome, scope: anyio.CancelScope) -> bool:
        """Score, record and report one example; True when racing says stop."""
        outcome = item if isinstance(item, Outcome) else await scored(item)
        record(outcome)
        if on_outcome is not None:
            maybe = on_outcome(outcome)
            if inspect.isawaitable(maybe):
                await maybe
        if run.cannot_win():
            run.stopped_early = True
            scope.cancel()
            return True
        return False

    async def predictor(
        out: MemoryObjectSendStream[_Predicted | Outcome] | None, scope: anyio.CancelScope
    ) -> None:
        nonlocal preflighted
        try:
            for index, item in iterator:
                example = item if prevalidated else _check_example(prompt, item, index)
                if not preflighted:
                    preflighted = True
                    await check_metric(metric, example)
                done = await predicted(index, example)
                if out is not None:
                    await out.send(done)
                elif await finish(done, scope):
                    return
        except Exception as exc:
            fail(exc, scope)
        finally:
            if out is not None:
                out.close()

    async def scorer(
        incoming: MemoryObjectReceiveStream[_Predicted | Outcome], scope: anyio.CancelScope
    ) -> None:
        async with incoming:
            try:
                async for item in incoming:
                    if await finish(item, scope):
                        return
            except Exception as exc:
                fail(exc, scope)

    emitter.emit(
        "evaluation.started",
        total=total,
        workers=workers,
        must_beat=must_beat,
        endpoint=endpoint.name,
    )
    async with anyio.create_task_group() as tg:
        if not _is_async(metric):
            # A sync metric cannot wait on I/O: score inline, no hand-off to pay for.
            for _ in range(workers):
                tg.start_soon(predictor, None, tg.cancel_scope)
        else:
            # Two pools joined by an unbuffered stream: a prediction goes to a free
            # metric worker, so a slow async metric (an LLM judge on its own endpoint)
            # holds predictions back only once every metric worker is busy, and
            # predictions never run far ahead of scoring (racing could save those).
            send, receive = anyio.create_memory_object_stream[_Predicted | Outcome](0)
            async with send, receive:
                for _ in range(workers):
                    tg.start_soon(predictor, send.clone(), tg.cancel_scope)
                for _ in range(scorers):
                    tg.start_soon(scorer, receive.clone(), tg.cancel_scope)
    wall = time.monotonic() - started

    if run.failure is not None:
        emitter.emit("evaluation.failed", level="error", error=run.failure, done=run.completed)
        raise run.failure
    if run.completed == 0:
        raise ConfigError("the dataset is empty")

    if results is not None and global_metric is not None and results:
        final = float(global_metric(results))
        if math.isnan(final) or not 0.0 <= final <= 1.0:
            raise MetricError(f"the global metric returned {final!r}, not a score in [0, 1]")
    else:
        # with nothing scored there is no score: NaN, never a silent 0
        final = float(run.score_sum / run.scored) if run.scored else math.nan
    outcomes.sort(key=lambda o: o.index)
    evaluation = Evaluation(
        prompt_hash=prompt.hash,
        score=final,
        total=total if total is not None else run.completed,
        completed=run.completed,
        scored=run.scored,
        errors=run.errors,
        calls=run.calls,
        cache_hits=run.cache_hits,
        retries=run.retries,
        usage=run.usage,
        wall_time=wall,
        stopped_early=run.stopped_early,
        upper_bound=float(run.upper_bound) if run.upper_bound is not None else None,
        must_beat=must_beat,
        outcomes=tuple(outcomes),
    )
    emitter.emit(
        "evaluation.finished",
        score=evaluation.score,
        done=run.completed,
        total=evaluation.total,
        errors=run.errors,
        calls=run.calls,
        cache_hits=run.cache_hits,
        retries=run.retries,
        tokens=run.usage.total_tokens,
        wall_time=round(wall, 3),
        stopped_early=run.stopped_early,
        upper_bound=evaluation.upper_bound,
    )
    return evaluation
