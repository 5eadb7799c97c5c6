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

With ``parallel_proposals=1`` this is exactly the sequential method; with ``k > 1``,
each attempt makes ``k`` proposals at once and keeps the best one that is accepted.
"""

from __future__ import annotations

import inspect
import math
import random
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio

from ._budget import Budget, BudgetMeter
from ._cache import Cache
from ._concurrency import run_all
from ._endpoint import Endpoint
from ._errors import BudgetExceededError, ConfigError, ProviderError
from ._evaluate import Evaluation, Outcome, check_metric, evaluate, validate_examples
from ._events import Emitter, EventCallback
from ._limits import Limits
from ._prompt import Prompt
from ._protocols import ChatModel, Metric
from ._report import ProposalRecord, RunReport, StepRecord
from ._stages import (
    ApplyContext,
    ApplyStage,
    GradientContext,
    GradientStage,
    HistoryEntry,
    LLMApply,
    LLMGradient,
    OptimizerCaller,
    ProposalError,
    describe_metric_messages,
    describe_task_messages,
    validate_proposal,
)
from ._types import Example

__all__ = ["OptimizationResult", "optimize"]

MAX_SCORE = 1.0


@dataclass(frozen=True, slots=True)
class OptimizationResult:
    """The best prompt, its full training score, its validation score, the report."""

    prompt: Prompt
    score: float
    val_score: float | None
    report: RunReport


def _metric_source(metric: Metric) -> str:
    target: Any = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return inspect.getdoc(target) or repr(metric)


class _Trainer:
    def __init__(
        self,
        *,
        prompt: Prompt,
        trainset: list[Example],
        valset: list[Example] | None,
        metric: Metric,
        task: Endpoint,
        optimizer: Endpoint,
        optimizer_model_name: str,
        batch_size: int,
        max_proposals_per_step: int,
        history_size: int,
        seed: int,
        task_description: str | None,
        metric_description: str | None,
        cache: Cache | None,
        racing: bool,
        parallel_proposals: int,
        meter: BudgetMeter,
        gradient: GradientStage,
        apply: ApplyStage,
        events: Emitter,
        occurrences: dict[str, int],
    ) -> None:
        self.initial = prompt
        self.occurrences = occurrences  # numbers identical optimizer requests in this run
        self.trainset = trainset
        self.valset = valset
        self.metric = metric
        self.task = task
        self.optimizer = optimizer
        self.optimizer_model_name = optimizer_model_name
        self.batch_size = batch_size
        self.max_proposals = max_proposals_per_step
        self.history_size = history_size
        self.seed = seed
        self.rng = random.Random(seed)  # owned by this run; never the global RNG
        self.task_description = task_description
        self.metric_description = metric_description
        self.cache = cache
        self.racing = racing
        self.parallel = parallel_proposals
        self.meter = meter
        self.gradient = gradient
        self.apply = apply
        self.events = events
        self.report = RunReport(
            initial_prompt=prompt.to_dict(),
            best_prompt=prompt.to_dict(),
            initial_score=math.nan,
            best_score=math.nan,
            settings={
                "batch_size": batch_size,
                "max_proposals_per_step": max_proposals_per_step,
                "history_size": history_size,
                "seed": seed,
                "racing": racing,
                "cache": cache is not None,
                "parallel_proposals": parallel_proposals,
                "train_size": len(trainset),
                "val_size": len(valset) if valset is not None else None,
            },
        )
        self.best = prompt
        self.best_score = math.nan

    # -- helpers ----------------------------------------------------------------------
    async def _evaluate(
        self, prompt: Prompt, data: Sequence[Example], *, must_beat: float | None = None
    ) -> Evaluation:
        result = await evaluate(
            prompt,
            data,
            model=self.task,
            metric=self.metric,
            cache=self.cache,
            must_beat=must_beat,
            events=self.events,
            meter=self.meter,
            validate=False,  # optimize() validated the data and the metric once
        )
        self.report.cache_hits += result.cache_hits
        return result

    async def _describe(self) -> None:
        if self.task_description is None:
            sample_rng = random.Random(f"{self.seed}:describe")  # independent of the shuffle
            sample = sample_rng.sample(self.trainset, min(3, len(self.trainset)))
            messages = describe_task_messages(self.initial, sample)
            self.task_description = await self._optimizer_text(messages)
            self.report.generated_descriptions.append("task")
        if self.metric_description is None:
            messages = describe_metric_messages(_metric_source(self.metric))
            self.metric_description = await self._optimizer_text(messages)
            self.report.generated_descriptions.append("metric")
        self.report.task_description = self.task_description
        self.report.metric_description = self.metric_description

    async def _optimizer_text(self, messages: list[dict[str, str]]) -> str:
        caller = OptimizerCaller(
            self.optimizer,
            model=self.optimizer_model_name,
            meter=self.meter,
            events=self.events,
            cache=self.cache,
            occurrences=self.occurrences,
        )
        params = {"model": caller.model, "temperature": caller.temperature}
        return (await caller.ask(messages, params)).strip()

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> OptimizationResult:
        started = anyio.current_time()
        try:
            await self._run()
            if not self.report.stopped_reason:
                self.report.stopped_reason = "all batches done"
        except BudgetExceededError as exc:
            self.report.stopped_reason = f"budget: {exc.message}"
            self.events.emit("optimize.budget_exceeded", level="warning", reason=exc.message)
        self.report.wall_time = anyio.current_time() - started
        self.report.best_prompt = self.best.to_dict()
        self.report.best_score = self.best_score
        self.report.calls = dict(self.meter.calls)
        self.report.tokens = {
            m: [u.prompt_tokens, u.completion_tokens] for m, u in self.meter.usage.items()
        }
        self.report.cost = self.meter.cost
        self.events.emit(
            "optimize.finished",
            score=self.best_score,
            val_score=self.report.val_score,
            steps=len(self.report.steps),
            calls=self.meter.total_calls,
            reason=self.report.stopped_reason,
        )
        return OptimizationResult(self.best, self.best_score, self.report.val_score, self.report)

    async def _run(self) -> None:
        await self._describe()
        full = await self._evaluate(self.best, self.trainset)
        self.best_score = full.score
        self.report.initial_score = self.report.best_score = full.score
        if self.valset is not None:
            val = await self._evaluate(self.best, self.valset)
            self.report.initial_val_score = self.report.val_score = val.score
        self.events.emit("optimize.started", score=full.score, train=len(self.trainset))
        if self.best_score >= MAX_SCORE:
            self.report.stopped_reason = "initial prompt already at the maximum score"
            return

        order = list(self.trainset)  # a copy: the caller's list is never shuffled
        self.rng.shuffle(order)
        history: deque[HistoryEntry] = deque(maxlen=self.history_size)
        for step, start in enumerate(range(0, len(order), self.batch_size)):
            batch = order[start : start + self.batch_size]
            record = await self._step(step, batch, history)
            if self.valset is not None:
                val = await self._evaluate(self.best, self.valset)
                record.val_score = self.report.val_score = val.score
            record.best_score = self.best_score
            self.report.steps.append(record)
            self.report.best_score = self.best_score
            self.events.emit(
                "optimize.step",
                step=step,
                best_score=self.best_score,
                val_score=record.val_score,
                proposals=len(record.proposals),
                perfect=record.perfect,
            )
            if self.best_score >= MAX_SCORE:
                self.report.stopped_reason = "maximum score reached"
                return

    async def _step(
        self, step: int, batch: list[Example], history: deque[HistoryEntry]
    ) -> StepRecord:
        current = await self._evaluate(self.best, batch)
        record = StepRecord(step, [e.id for e in batch], current.score, self.best_score)
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
        for attempt in range(self.max_proposals):
            gradients = await self._gradients(failed, feedback_history, record)
            if not gradients:
                break
            for example_id, text in gradients:
                feedback_history.setdefault(example_id, []).append(text)
            feedback = tuple(text for _, text in gradients)
            proposals = await self._proposals(
                step, attempt, batch, current.score, feedback, history
            )
            record.proposals.extend(proposals)
            winner = max(
                (p for p in proposals if p.accepted),
                key=lambda p: (p.full_score or 0.0, -p.variant),
                default=None,
            )
            if winner is not None:
                assert winner.prompt is not None
                self.best = Prompt.from_dict(winner.prompt)
                self.best_score = winner.full_score if winner.full_score is not None else math.nan
                record.gradients = list(feedback)
                for p in proposals:
                    if p.accepted and p is not winner:
                        p.accepted = False
                        p.reason = "beaten by a parallel proposal"
                self.events.emit(
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
        task_description, metric_description = self.task_description, self.metric_description

        def thunk(example: Example, outcome: Outcome) -> Any:
            async def call() -> str:
                assert outcome.result is not None and outcome.prediction is not None
                ctx = GradientContext(
                    task_description=task_description,
                    metric_description=metric_description,
                    prompt=self.best,
                    example=example,
                    prediction=outcome.prediction,
                    result=outcome.result,
                    earlier_feedback=tuple(feedback_history.get(example.id, ())),
                )
                try:
                    return await self.gradient(ctx)
                except ProviderError as exc:
                    if exc.fatal:
                        raise
                    record.gradient_errors.append(f"{example.id}: {exc.message}")
                    return ""

            return call

        texts = await run_all([thunk(e, o) for e, o in failed])
        return [
            (e.id, t.strip()) for (e, _), t in zip(failed, texts, strict=True) if t and t.strip()
        ]

    async def _proposals(
        self,
        step: int,
        attempt: int,
        batch: list[Example],
        batch_score: float,
        feedback: tuple[str, ...],
        history: deque[HistoryEntry],
    ) -> list[ProposalRecord]:
        assert self.task_description is not None
        task_description = self.task_description
        snapshot = tuple(history)
        records = [ProposalRecord(step, attempt, variant, None) for variant in range(self.parallel)]

        async def one(variant: int) -> Prompt | None:
            ctx = ApplyContext(task_description, self.best, feedback, snapshot, variant)
            rec = records[variant]
            try:
                proposal = await self.apply(ctx)
                if not isinstance(proposal, Prompt):
                    raise ProposalError(
                        f"the apply stage returned a {type(proposal).__name__}, not a Prompt",
                        raw=repr(proposal)[:2000],
                    )
                rec.prompt = proposal.to_dict()
                validate_proposal(proposal, self.best)
            except ProposalError as exc:
                rec.reason = f"invalid: {exc.message}"
                rec.raw = exc.raw
                return None
            except ProviderError as exc:
                if exc.fatal:
                    raise
                rec.reason = f"invalid: apply call failed: {exc.message}"
                return None
            return proposal

        candidates = await run_all([lambda v=v: one(v) for v in range(self.parallel)])  # type: ignore[misc]

        async def validate(variant: int, candidate: Prompt) -> None:
            rec = records[variant]
            on_batch = await self._evaluate(candidate, batch)
            rec.batch_score = on_batch.score
            if not on_batch.score > batch_score:
                rec.reason = "no batch improvement"
                return
            must_beat = self.best_score if self.racing and not math.isnan(self.best_score) else None
            full = await self._evaluate(candidate, self.trainset, must_beat=must_beat)
            self.report.full_evaluations += 1
            if full.stopped_early:
                self.report.raced_evaluations += 1
                self.report.examples_skipped_by_racing += full.total - full.completed
                rec.full_score = full.upper_bound
                rec.raced = {
                    "completed": full.completed,
                    "total": full.total,
                    "upper_bound": full.upper_bound,
                }
                rec.reason = (
                    f"no full-set improvement: cut by racing after {full.completed}/{full.total} "
                    f"(could reach at most {full.upper_bound:.4f} <= {self.best_score:.4f})"
                )
                return
            rec.full_score = full.score
            if full.score > self.best_score:
                rec.accepted = True
                rec.reason = "accepted"
            else:
                rec.reason = f"no full-set improvement: {full.score:.4f} <= {self.best_score:.4f}"

        await run_all(
            [
                (lambda v=v, c=c: validate(v, c))  # type: ignore[misc]
                for v, c in enumerate(candidates)
                if c is not None
            ]
        )
        # History in variant order, so k = 1 and k > 1 read it the same way.
        for rec in records:
            if rec.prompt is None or rec.reason.startswith("invalid"):
                continue
            if rec.reason == "no batch improvement":
                history.append(
                    HistoryEntry(Prompt.from_dict(rec.prompt), 0.0, "no batch improvement")
                )
            else:
                note = "upper bound, cut by racing" if rec.raced else ""
                score = rec.full_score if rec.full_score is not None else 0.0
                history.append(HistoryEntry(Prompt.from_dict(rec.prompt), score, note))
        return records


async def optimize(
    prompt: Prompt,
    trainset: Iterable[Example],
    *,
    valset: Iterable[Example] | None = None,
    metric: Metric,
    model: ChatModel | Endpoint,
    optimizer_model: ChatModel | Endpoint,
    optimizer_model_name: str | None = None,
    batch_size: int = 4,
    max_proposals_per_step: int = 5,
    history_size: int = 4,
    seed: int = 42,
    task_description: str | None = None,
    metric_description: str | None = None,
    cache: Cache | Literal[False] | None = None,
    racing: bool = True,
    parallel_proposals: int = 1,
    budget: Budget | None = None,
    on_event: EventCallback | None = None,
    gradient: GradientStage | None = None,
    apply: ApplyStage | None = None,
    limits: Limits | None = None,
    optimizer_limits: Limits | None = None,
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
        racing: exact early stopping of full-set validation (same decisions, fewer calls).
        parallel_proposals: proposals per attempt made and validated concurrently;
            1 reproduces the sequential method exactly.
        budget: caps on calls, tokens and money; reaching one stops the run cleanly
            with the best prompt so far and ``report.stopped_reason``.
        on_event: progress callback (events are also logged through structlog).
        gradient, apply: replacement stages (plain async callables); ``None`` means
            the default LLM stage.
        limits, optimizer_limits: limits for bare chat models.
    """
    train = list(trainset)
    validate_examples(prompt, train)
    val = list(valset) if valset is not None else None
    if val is not None:
        validate_examples(prompt, val)
    for name, value in (
        ("batch_size", batch_size),
        ("max_proposals_per_step", max_proposals_per_step),
        ("history_size", history_size),
        ("parallel_proposals", parallel_proposals),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")
    if model is optimizer_model:
        task_endpoint = opt_endpoint = Endpoint.of(model, limits=limits)
    else:
        task_endpoint = Endpoint.of(model, limits=limits)
        opt_endpoint = Endpoint.of(optimizer_model, limits=optimizer_limits)
    opt_name = optimizer_model_name or prompt.model
    meter = BudgetMeter(budget, models=[prompt.model, opt_name])
    await check_metric(metric, train[0])  # a broken metric fails before the first paid call
    run_cache = None if cache is False else (cache if cache is not None else Cache())
    events = Emitter(on_event).bind(run=uuid.uuid4().hex[:8])
    occurrences: dict[str, int] = {}
    trainer = _Trainer(
        prompt=prompt,
        trainset=train,
        valset=val,
        metric=metric,
        task=task_endpoint,
        optimizer=opt_endpoint,
        optimizer_model_name=opt_name,
        batch_size=batch_size,
        max_proposals_per_step=max_proposals_per_step,
        history_size=history_size,
        seed=seed,
        task_description=task_description,
        metric_description=metric_description,
        cache=run_cache,
        racing=racing,
        parallel_proposals=parallel_proposals,
        meter=meter,
        gradient=gradient
        or LLMGradient(
            opt_endpoint,
            model=opt_name,
            meter=meter,
            events=events,
            cache=run_cache,
            occurrences=occurrences,
        ),
        apply=apply
        or LLMApply(
            opt_endpoint,
            model=opt_name,
            meter=meter,
            events=events,
            cache=run_cache,
            occurrences=occurrences,
        ),
        events=events,
        occurrences=occurrences,
    )
    return await trainer.run()
