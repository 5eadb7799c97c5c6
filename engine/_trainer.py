"""TextGradientTrainer: `optimize()`.

The loop follows DESIGN.md section 2 step by step:

1. score the initial prompt on the whole training set;
2. shuffle a copy of the training set with the run's own seeded RNG;
3. per batch: score the best prompt on it (cache hits); skip a perfect batch; else up
   to ``max_proposals_per_step`` times: gradients for every failed example at once,
   apply, validate the proposal, score it on the batch, and only if it beats the best
   there, on the whole training set (racing against the best score); accept it if it
   beats the best score;
4. record each step (train, and val when given) and stop at the maximum score.

Every decision compares like with like: the *conservative* score, an errored example
counted as a failure, so a candidate cannot win by erroring.  The best prompt's
training score may rest on at most ``max_error_rate`` errored examples; past that the
run stops with `TooManyErrorsError` rather than optimize on noise.

With ``parallel_proposals=1`` this is exactly the sequential method; with ``k > 1``,
each attempt makes ``k`` proposals at once and keeps the best one that is accepted.
How proposals are made and judged lives in `engine._proposals`.
"""

from __future__ import annotations

import inspect
import math
import random
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ._aggregate import is_mean
from ._budget import Budget, BudgetMeter
from ._concurrency import run_all
from ._errors import BudgetExceededError, ConfigError, ProviderError, TooManyErrorsError
from ._evaluate import evaluate, validate_examples
from ._events import Emitter, EventCallback
from ._outcome import Evaluation, GlobalMetric, Outcome
from ._prompt import Prompt
from ._proposals import Proposer, best_accepted
from ._protocols import ChatModel, Metric
from ._scoring import check_metric
from ._settings import TrainerSettings
from ._types import Example
from .cache import Cache
from .endpoint import Endpoint, Limits
from .report import RunReport, StepRecord
from .stages import (
    ApplyStage,
    GradientContext,
    GradientStage,
    HistoryEntry,
    LLMApply,
    LLMGradient,
    OptimizerCaller,
    describe_metric_messages,
    describe_task_messages,
)
from .tracing import run_span, span

if TYPE_CHECKING:
    from .cluster import RayCluster

__all__ = ["OptimizationResult", "TrainerSettings", "optimize"]

MAX_SCORE = 1.0
DEFAULTS = TrainerSettings()


@dataclass(frozen=True, slots=True)
class OptimizationResult:
    """The best prompt, its training score, its validation score, the report.

    ``score`` is the conservative training score (errored examples count as failures),
    the one every decision used; the report also shows the mean over scored examples.
    """

    prompt: Prompt
    score: float
    val_score: float | None
    report: RunReport


@dataclass(frozen=True, kw_only=True, slots=True)
class _Parts:
    """What one run works with besides its settings: data, metric, endpoints, stages."""

    trainset: list[Example]
    valset: list[Example] | None
    metric: Metric
    global_metric: GlobalMetric | None
    task: Endpoint
    optimizer: OptimizerCaller
    cache: Cache | None
    meter: BudgetMeter
    gradient: GradientStage
    apply: ApplyStage
    events: Emitter
    metric_timeout: float | None
    metric_threads: int
    cluster: RayCluster | None = None  # runs the whole-set evaluations; batches stay local


def _metric_source(metric: Metric) -> str:
    target: Any = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return inspect.getdoc(target) or repr(metric)


class _Trainer:
    def __init__(self, prompt: Prompt, settings: TrainerSettings, parts: _Parts) -> None:
        self.initial = prompt
        self.settings = settings
        self.parts = parts
        self.racing = settings.racing and is_mean(parts.global_metric)
        self.rng = random.Random(settings.seed)  # owned by this run; never the global RNG
        self.report = RunReport(
            initial_prompt=prompt.to_dict(),
            best_prompt=prompt.to_dict(),
            initial_score=math.nan,
            best_score=math.nan,
            settings={
                **settings.to_dict(),
                "cache": parts.cache is not None,
                "train_size": len(parts.trainset),
                "val_size": len(parts.valset) if parts.valset is not None else None,
                "global_metric": _name(parts.global_metric),
            },
        )
        if settings.racing and not self.racing:
            self.report.notes.append(
                f"racing off: the global metric {_name(parts.global_metric)} has no known "
                "bound, so every candidate is validated on the whole training set"
            )
        self.best = prompt
        self.best_score = math.nan
        self.task_description = settings.task_description
        self.metric_description = settings.metric_description

    async def evaluate(
        self, prompt: Prompt, data: Sequence[Example], *, must_beat: float | None = None
    ) -> Evaluation:
        p = self.parts
        whole = data is p.trainset or data is p.valset
        result = await evaluate(
            prompt,
            data,
            model=p.task,
            metric=p.metric,
            cache=p.cache,
            must_beat=must_beat,
            global_metric=p.global_metric,
            events=p.events,
            meter=p.meter,
            metric_timeout=p.metric_timeout,
            metric_threads=p.metric_threads,
            validate=False,  # optimize() validated the data and the metric once
            cluster=p.cluster if whole else None,
        )
        self.report.cache_hits += result.cache_hits
        self.report.errors += result.errors
        return result

    def check_error_rate(self, evaluation: Evaluation, what: str) -> None:
        """Stop the run when the best prompt's training score rests on too many errors."""
        limit = self.settings.max_error_rate
        if evaluation.error_rate <= limit:
            return
        first = next((o.error for o in evaluation.outcomes if o.error is not None), None)
        cause = f"; first: {first.type}: {first.message}" if first is not None else ""
        reason = (
            f"{evaluation.errors} of {evaluation.completed} examples "
            f"({evaluation.error_rate:.0%}) failed after retries scoring {what}, more than "
            f"max_error_rate={limit:g}{cause}"
        )
        self.report.stopped_reason = f"error rate: {reason}"
        self.finish_report()
        raise TooManyErrorsError(reason, report=self.report)

    # -- the run ----------------------------------------------------------------------
    async def run(self) -> OptimizationResult:
        started = anyio.current_time()
        try:
            await self._run()
            if not self.report.stopped_reason:
                self.report.stopped_reason = "all batches done"
        except BudgetExceededError as exc:
            if math.isnan(self.best_score):
                raise  # no score at all: nothing to return
            self.report.stopped_reason = f"budget: {exc.message}"
            self.parts.events.emit("optimize.budget_exceeded", level="warning", reason=exc.message)
        self.report.wall_time = anyio.current_time() - started
        self.finish_report()
        self.parts.events.emit(
            "optimize.finished",
            score=self.best_score,
            val_score=self.report.val_score,
            steps=len(self.report.steps),
            calls=self.parts.meter.total_calls,
            reason=self.report.stopped_reason,
        )
        return OptimizationResult(self.best, self.best_score, self.report.val_score, self.report)

    def finish_report(self) -> None:
        meter = self.parts.meter
        self.report.best_prompt = self.best.to_dict()
        self.report.best_score = self.best_score
        self.report.calls = dict(meter.calls)
        self.report.tokens = {
            m: [u.prompt_tokens, u.completion_tokens] for m, u in meter.usage.items()
        }
        self.report.cost = meter.cost

    async def _run(self) -> None:
        await self._describe()
        if await self._start():
            return
        order = list(self.parts.trainset)  # a copy: the caller's list is never shuffled
        self.rng.shuffle(order)
        history: deque[HistoryEntry] = deque(maxlen=self.settings.history_size)
        for step, start in enumerate(range(0, len(order), self.settings.batch_size)):
            batch = order[start : start + self.settings.batch_size]
            with span("step", **{"engine.step": step}):
                record = await self._step(step, batch, history)
                await self._close_step(record)
            if self.best_score >= MAX_SCORE:
                self.report.stopped_reason = "maximum score reached"
                return

    async def _start(self) -> bool:
        """Score the initial prompt (train, val); True when there is nothing to do."""
        full = await self.evaluate(self.best, self.parts.trainset)
        self.check_error_rate(full, "the initial prompt on the training set")
        self.best_score = full.conservative_score
        report = self.report
        report.initial_score = report.best_score = full.conservative_score
        report.initial_mean, report.initial_errors = full.score, full.errors
        if self.parts.valset is not None:
            val = await self.evaluate(self.best, self.parts.valset)
            report.initial_val_score = report.val_score = val.conservative_score
        self.parts.events.emit("optimize.started", score=self.best_score, train=full.total)
        if self.best_score >= MAX_SCORE:
            report.stopped_reason = "initial prompt already at the maximum score"
            return True
        return False

    async def _close_step(self, record: StepRecord) -> None:
        if self.parts.valset is not None:
            val = await self.evaluate(self.best, self.parts.valset)
            record.val_score = self.report.val_score = val.conservative_score
        record.best_score = self.best_score
        self.report.steps.append(record)
        self.report.best_score = self.best_score
        self.parts.events.emit(
            "optimize.step",
            step=record.step,
            best_score=self.best_score,
            val_score=record.val_score,
            proposals=len(record.proposals),
            perfect=record.perfect,
            batch_score=record.batch_score,
            calls=self.parts.meter.total_calls,
        )

    async def _describe(self) -> None:
        p = self.parts
        if self.task_description is None:
            sample_rng = random.Random(f"{self.settings.seed}:describe")  # apart from the shuffle
            sample = sample_rng.sample(p.trainset, min(3, len(p.trainset)))
            messages = describe_task_messages(self.initial, sample)
            self.task_description = await p.optimizer.ask_text(messages)
            self.report.generated_descriptions.append("task")
        if self.metric_description is None:
            messages = describe_metric_messages(_metric_source(p.metric))
            self.metric_description = await p.optimizer.ask_text(messages)
            self.report.generated_descriptions.append("metric")
        self.report.task_description = self.task_description
        self.report.metric_description = self.metric_description

    # -- one batch --------------------------------------------------------------------
    async def _step(
        self, step: int, batch: list[Example], history: deque[HistoryEntry]
    ) -> StepRecord:
        current = await self.evaluate(self.best, batch)
        record = StepRecord(
            step, [e.id for e in batch], current.conservative_score, self.best_score
        )
        record.batch_errors = current.errors
        failed = [
            (example, outcome)
            for example, outcome in zip(batch, current.outcomes, strict=True)
            if outcome.result is not None and outcome.result.score < MAX_SCORE
        ]
        if not failed:
            # nothing to learn from; "perfect" only if no example errored either
            record.perfect = current.errors == 0
            return record
        feedback_history: dict[str, list[str]] = {}  # per example, reset every batch
        proposer = Proposer(self, batch, current.conservative_score, history)
        for attempt in range(self.settings.max_proposals_per_step):
            with span("proposal", **{"engine.step": step, "engine.proposal.attempt": attempt}):
                with span("gradient", **{"engine.examples.failed": len(failed)}):
                    gradients = await self._gradients(failed, feedback_history, record)
                if not gradients:
                    break
                for example_id, text in gradients:
                    feedback_history.setdefault(example_id, []).append(text)
                feedback = tuple(text for _, text in gradients)
                proposals = await proposer.attempt(step, attempt, feedback)
                record.proposals.extend(proposals)
                winner = best_accepted(proposals)
                if winner is not None:
                    assert winner.prompt is not None and winner.full_score is not None
                    self.best = Prompt.from_dict(winner.prompt)
                    self.best_score = winner.full_score
                    record.gradients = list(feedback)
                    self.parts.events.emit(
                        "optimize.accepted", step=step, attempt=attempt, score=self.best_score
                    )
                    break
        return record

    async def _gradients(
        self,
        failed: list[tuple[Example, Outcome]],
        feedback_history: dict[str, list[str]],
        record: StepRecord,
    ) -> list[tuple[str, str]]:
        assert self.task_description is not None and self.metric_description is not None
        contexts = [
            GradientContext(
                task_description=self.task_description,
                metric_description=self.metric_description,
                prompt=self.best,
                example=example,
                prediction=outcome.prediction or "",
                result=outcome.result,  # type: ignore[arg-type]  # failed: scored ones only
                earlier_feedback=tuple(feedback_history.get(example.id, ())),
            )
            for example, outcome in failed
        ]

        async def feedback_on(ctx: GradientContext) -> str:
            try:
                return await self.parts.gradient(ctx)
            except ProviderError as exc:
                if exc.fatal:
                    raise
                record.gradient_errors.append(f"{ctx.example.id}: {exc.message}")
                return ""

        texts = await run_all([lambda ctx=ctx: feedback_on(ctx) for ctx in contexts])  # type: ignore[misc]
        return [
            (ctx.example.id, text.strip())
            for ctx, text in zip(contexts, texts, strict=True)
            if text and text.strip()
        ]


def _name(global_metric: GlobalMetric | None) -> str:
    if global_metric is None or is_mean(global_metric):
        return "mean"
    return str(getattr(global_metric, "__qualname__", type(global_metric).__qualname__))


async def optimize(
    prompt: Prompt,
    trainset: Iterable[Example],
    *,
    valset: Iterable[Example] | None = None,
    metric: Metric,
    model: ChatModel | Endpoint,
    optimizer_model: ChatModel | Endpoint,
    optimizer_model_name: str | None = None,
    batch_size: int = DEFAULTS.batch_size,
    max_proposals_per_step: int = DEFAULTS.max_proposals_per_step,
    history_size: int = DEFAULTS.history_size,
    seed: int = DEFAULTS.seed,
    task_description: str | None = None,
    metric_description: str | None = None,
    cache: Cache | Literal[False] | None = None,
    racing: bool = DEFAULTS.racing,
    parallel_proposals: int = DEFAULTS.parallel_proposals,
    max_error_rate: float = DEFAULTS.max_error_rate,
    global_metric: GlobalMetric | None = None,
    metric_timeout: float | None = 60.0,
    metric_threads: int = 16,
    budget: Budget | None = None,
    on_event: EventCallback | None = None,
    gradient: GradientStage | None = None,
    apply: ApplyStage | None = None,
    limits: Limits | None = None,
    optimizer_limits: Limits | None = None,
    cluster: RayCluster | None = None,
) -> OptimizationResult:
    """Optimize ``prompt`` on ``trainset`` with text gradients (TextGradientTrainer).

    Parameters:
        prompt: the initial prompt (its model runs on ``model``).
        trainset: training examples; every accepted candidate beats the best on the
            *whole* set.  Never mutated; shuffled as a copy.
        valset: optional validation examples, scored after every step.
        metric: per-example metric returning a score in [0, 1] (plus feedback).
        model: the endpoint running the prompt being optimized.
        optimizer_model: the endpoint running gradient, apply and description calls
            (may be the same object as ``model``; then they share limits).
        optimizer_model_name: model name for optimizer calls; defaults to the prompt's.
        batch_size, max_proposals_per_step, history_size, seed: the method's settings.
        task_description, metric_description: generated by LLM calls when not given.
        cache: a `Cache` (default: a fresh in-memory one); ``False`` turns caching off.
        racing: exact early stopping of full-set validation (same decisions, fewer
            calls); only with the mean as global metric (the report says when it is off).
        parallel_proposals: proposals per attempt made and validated concurrently;
            1 reproduces the sequential method exactly.
        max_error_rate: the share of errored examples (after retries) the best prompt's
            training score may rest on; past it the run stops with `TooManyErrorsError`.
        global_metric: aggregate of per-example results (mean by default; F1 or a
            weighted mean over ``MetricResult.trace`` are common).
        metric_timeout, metric_threads: as for `evaluate`.
        budget: caps on calls, tokens and money; reaching one stops the run cleanly
            with the best prompt so far and ``report.stopped_reason`` (before the
            initial prompt has a score, it raises `BudgetExceededError`).
        on_event: progress callback (events are also logged through structlog).
        gradient, apply: replacement stages (plain async callables); ``None`` means
            the default LLM stage.
        limits, optimizer_limits: limits for bare chat models.
        cluster: an `engine.cluster.RayCluster` for the whole-set evaluations (the
            training set, and the validation set); batches and optimizer calls stay
            here.  The decisions are the same as a local run's.
    """
    settings = TrainerSettings(
        batch_size=batch_size,
        max_proposals_per_step=max_proposals_per_step,
        history_size=history_size,
        seed=seed,
        racing=racing,
        parallel_proposals=parallel_proposals,
        max_error_rate=max_error_rate,
        task_description=task_description,
        metric_description=metric_description,
    )
    train, val = _checked_data(prompt, trainset, valset)
    task = Endpoint.of(model, limits=limits)
    opt = (
        task if optimizer_model is model else Endpoint.of(optimizer_model, limits=optimizer_limits)
    )
    opt_name = optimizer_model_name or prompt.model
    meter = BudgetMeter(budget, models=[prompt.model, opt_name])
    await check_metric(metric, train[0])  # a broken metric fails before the first paid call
    run_cache = None if cache is False else (cache if cache is not None else Cache())
    events = Emitter(on_event).bind(run=uuid.uuid4().hex[:8])
    caller = OptimizerCaller(
        opt, model=opt_name, meter=meter, events=events, cache=run_cache, request_counts={}
    )
    parts = _Parts(
        trainset=train,
        valset=val,
        metric=metric,
        global_metric=global_metric,
        task=task,
        optimizer=caller,
        cache=run_cache,
        meter=meter,
        gradient=gradient or LLMGradient.sharing(caller),
        apply=apply or LLMApply.sharing(caller),
        events=events,
        metric_timeout=metric_timeout,
        metric_threads=metric_threads,
        cluster=cluster,
    )
    with run_span("optimize", task.name, **{"engine.train.size": len(train)}):
        return await _Trainer(prompt, settings, parts).run()


def _checked_data(
    prompt: Prompt, trainset: Iterable[Example], valset: Iterable[Example] | None
) -> tuple[list[Example], list[Example] | None]:
    train = list(trainset)
    validate_examples(prompt, train)
    val = list(valset) if valset is not None else None
    if val is not None:
        validate_examples(prompt, val)
        by_id = {e.id: e for e in train}
        for example in val:
            other = by_id.get(example.id)
            if other is not None and other.inputs_hash != example.inputs_hash:
                raise ConfigError(
                    f"example id {example.id!r} is in the training and the validation set "
                    "with different inputs; give one of them another id"
                )
    return train, val
