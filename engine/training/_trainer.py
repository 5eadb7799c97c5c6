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
counted as a failure, so a candidate cannot win by erroring.  The initial prompt's
training score may rest on at most ``max_error_rate`` errored examples; past that the
run stops with `TooManyErrorsError` rather than optimize on noise.  A candidate that
beats the best with its errors counted as failures is better whatever they would have
scored: it is accepted above the rate (the report notes it) and the run goes on.  Before
a candidate is compared, the best prompt's errored examples are re-run, so the bar is
never a number lowered by a stale error.

With ``parallel_proposals=1`` this is exactly the sequential method; with ``k > 1``,
each attempt makes ``k`` proposals at once and keeps the best one that is accepted.
How proposals are made and judged lives in `engine.training._proposals`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
import uuid
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from .._aggregate import check_global_metric, conservative_score, is_mean
from .._budget import Budget, BudgetMeter
from .._concurrency import run_all
from .._errors import (
    BadRequestError,
    BudgetExceededError,
    ConfigError,
    GlobalMetricError,
    ProviderError,
    StageError,
    TooManyErrorsError,
)
from .._evaluate import evaluate, validate_examples
from .._events import Emitter, EventCallback
from .._options import EvaluationBackend
from .._outcome import Evaluation, GlobalMetric, Outcome
from .._prompt import Prompt, render_value
from .._protocols import ChatModel, Metric
from .._scoring import MetricRunner, check_metric
from .._types import Example
from ..cache import Cache
from ..endpoint import Endpoint, Limits
from ..program import (
    Component,
    Program,
    ProgramSetup,
    blamed_stage,
    check_component,
    dry_run,
    program_setup,
)
from ..report import ProposalRecord, RunReport, StepRecord
from ..stages import (
    ApplyStage,
    GradientContext,
    GradientStage,
    HistoryEntry,
    LLMApply,
    LLMGradient,
    OptimizerCaller,
    describe_metric_messages,
    describe_task_messages,
    escape_surrogates,
)
from ..tracing import run_span, span
from ._proposals import Proposer, best_accepted, undecided
from ._selection import (
    Candidate,
    ParetoPool,
    TieKey,
    cost_per_example,
    prompt_length,
    tie_key,
)
from ._settings import TrainerSettings

__all__ = ["OptimizationResult", "TrainerSettings", "optimize"]

MAX_SCORE = 1.0
DEFAULTS = TrainerSettings()


@dataclass(frozen=True, slots=True)
class OptimizationResult:
    """The best prompt, its score, its validation score, the report.

    ``score`` is the conservative score (errored examples count as failures) every
    decision used: on the training set by default, on the validation set with
    ``accept_on="val"`` or ``selection="pareto"`` (``report.judged_on`` says which);
    the report also shows the mean over scored examples.

    A program's run: ``prompts`` holds the best version of every prompt by name
    (``prompt`` is the first of them); for one prompt it is empty.
    """

    prompt: Prompt
    score: float
    val_score: float | None
    report: RunReport
    prompts: Mapping[str, Prompt] = field(default_factory=dict)


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
    cluster: EvaluationBackend | None = None  # runs the whole-set evaluations; batches stay local
    program: ProgramSetup | None = None  # a program's prompts: one of them is updated per step
    component: Component = "round_robin"


def _metric_source(metric: Metric) -> str:
    target: Any = metric if inspect.isfunction(metric) or inspect.ismethod(metric) else type(metric)
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return inspect.getdoc(target) or repr(metric)


# Bad requests from a stage that never worked, after which the run ends (StageError):
# 404s (the endpoint has no such model or path), and other 400s (a request too long).
_FATAL_REPEATS = 3
_FATAL_REQUEST_REPEATS = 20


class _Trainer:
    def __init__(self, prompt: Prompt, settings: TrainerSettings, parts: _Parts) -> None:
        self.initial = prompt
        self.settings = settings
        self.parts = parts
        self.pareto = settings.selection == "pareto"
        self.racing = settings.racing and is_mean(parts.global_metric) and not self.pareto
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
        self.report.judged_on = "val" if self.judge_set is parts.valset else "train"
        if settings.racing and self.pareto:
            self.report.notes.append(
                'racing off: selection="pareto" needs every candidate\'s score on each '
                "validation example, so every candidate runs on the whole validation set "
                "(the cache makes re-scoring free)"
            )
        elif settings.racing and not self.racing:
            self.report.notes.append(
                f"racing off: the global metric {_name(parts.global_metric)} has no known "
                "bound, so every candidate is validated on the whole training set"
            )
        # every prompt by name (one prompt: the name ""); `best` is the one this step updates
        self.prompts: dict[str, Prompt] = (
            dict(parts.program.prompts) if parts.program is not None else {"": prompt}
        )
        self.initial_prompts = dict(self.prompts)
        self.stage = next(iter(self.prompts))
        self.turn = 0  # round robin: steps that updated a prompt so far
        self.blamed: list[tuple[str, str]] | None = None  # blame: the next attempt's gradients
        self.changed_at: dict[str, list[int]] = {name: [] for name in self.prompts}
        self.best_score = math.nan
        # the best prompt's outcomes on the whole training set, in dataset order: its
        # errored examples are re-run before a candidate is compared with it
        self.best_outcomes: tuple[Outcome, ...] = ()
        self.refresh_lock = anyio.Lock()
        self.stage_worked: set[str] = set()  # stages with at least one good call
        self.stage_bad_requests: dict[str, int] = {}  # ... and their bad requests so far
        self.val_measured: str | None = None  # hash of the prompt report.val_score measured
        self.task_description = settings.task_description
        self.metric_description = settings.metric_description
        self.price = parts.meter.budget.price_table().get(prompt.model)
        # pareto: the candidate pool, its parent draws by an RNG apart from the shuffle
        self.pool: ParetoPool | None = None
        if self.pareto:
            assert parts.valset is not None  # optimize() checked it
            self.pool = ParetoPool(
                [e.id for e in parts.valset], random.Random(f"{settings.seed}:pareto")
            )
        self.best_val = math.nan  # patience: the best validation score seen so far
        self.stale_steps = 0  # steps since it last improved

    @property
    def best(self) -> Prompt:
        """The best version of the prompt being improved (a program's: this stage's)."""
        return self.prompts[self.stage]

    @best.setter
    def best(self, prompt: Prompt) -> None:
        self.prompts[self.stage] = prompt

    def best_id(self) -> str:
        """What the best score measures: the prompt, or every prompt of the program."""
        if self.parts.program is None:
            return self.best.hash
        return ":".join(self.prompts[n].hash for n in sorted(self.prompts))

    @property
    def judge_set(self) -> list[Example]:
        """The set of the whole-set step: training (the seed's rule) or validation."""
        p = self.parts
        if p.valset is not None and (self.pareto or self.settings.accept_on == "val"):
            return p.valset
        return p.trainset

    def key_of(self, prompt: Prompt, outcomes: Sequence[Outcome]) -> TieKey:
        """The tie-break key of ``prompt`` measured on ``outcomes`` (``()`` without one)."""
        order = self.settings.tie_break
        if not order:
            return ()
        return tie_key(order, cost_per_example(outcomes, self.price), prompt_length(prompt))

    def best_key(self) -> TieKey:
        return self.key_of(self.best, self.best_outcomes)

    def pool_candidate(
        self, prompt: Prompt, val: Evaluation, parents: tuple[int, ...], step: int
    ) -> Candidate:
        """A pool entry: ``prompt`` with its per-example conservative validation scores."""
        assert self.pool is not None
        cost = cost_per_example(val.outcomes, self.price)
        length = prompt_length(prompt)
        return Candidate(
            id=self.pool.next_id(),
            prompt=prompt,
            parents=parents,
            scores=tuple(o.score if o.score is not None else 0.0 for o in val.outcomes),
            mean=val.conservative_score,
            key=tie_key(self.settings.tie_break, cost, length),
            step=step,
            cost=cost,
            length=length,
        )

    async def evaluate(
        self, prompt: Prompt, data: Sequence[Example], *, must_beat: float | None = None
    ) -> Evaluation:
        p = self.parts
        whole = data is p.trainset or data is p.valset
        program = p.program
        result = await evaluate(
            prompt if program is None else {**self.prompts, self.stage: prompt},
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
            program=program,
        )
        self.report.cache_hits += result.cache_hits
        self.report.errors += result.errors
        self.report.answers += result.completed - result.cache_hits
        self.report.truncated += result.truncated
        self.report.timeouts += result.timeouts
        return result

    def check_error_rate(self, evaluation: Evaluation, what: str) -> None:
        """Stop the run when the initial prompt's training score rests on too many errors."""
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

    def stage_failed(self, stage: str, exc: ProviderError) -> None:
        """Count and announce one failed stage call; raise `StageError` (`check_stage`)
        when it can only repeat: a bad request (not found, invalid) from a stage that never
        worked in this run (a misspelled optimizer model fails every call alike)."""
        self.count_stage_error(stage, exc.message)
        self.check_stage(stage, exc)

    def count_stage_error(self, stage: str, error: str) -> None:
        self.report.stage_errors[stage] = self.report.stage_errors.get(stage, 0) + 1
        self.parts.events.emit("optimize.stage_error", level="warning", stage=stage, error=error)

    def check_stage(self, stage: str, exc: ProviderError) -> None:
        """A bad request from a stage that never worked ends the run once it repeats:
        a 404 (a misspelled model, a wrong path: every call fails alike) after
        `_FATAL_REPEATS` calls; any other (a 400: one example too long for a small
        model's context, as much the request's fault as the endpoint's) only after
        `_FATAL_REQUEST_REPEATS`, when no call of the stage has worked at all.  A
        description is asked once, so its first bad request is final."""
        if not isinstance(exc, BadRequestError) or stage in self.stage_worked:
            return
        self.stage_bad_requests[stage] = self.stage_bad_requests.get(stage, 0) + 1
        limit = _FATAL_REPEATS if exc.status == 404 else _FATAL_REQUEST_REPEATS
        if stage == "describe" or self.stage_bad_requests[stage] >= limit:
            raise self.fatal_stage(stage, exc)

    def fatal_stage(self, stage: str, exc: ProviderError) -> StageError:
        """The named error that ends the run, with the report up to here attached."""
        reason = (
            f"the {stage} stage failed with a permanent error and never worked in this run: "
            f"{type(exc).__name__}: {exc.message}"
        )
        self.report.stopped_reason = f"stage error: {reason}"
        self.finish_report()
        return StageError(reason, stage=stage, report=self.report)

    async def refresh_best(self) -> None:
        """Re-run the examples the best prompt errored on and refresh ``best_score``.

        Errors are not cached and count as failures, so the best score would otherwise
        keep a transient error for good and a candidate that merely ties could beat a
        number the best prompt would not get today.  Only the errored examples run
        again (a subset: the cache or not, the other rows are not paid twice); with no
        error there is nothing to do and the run is exactly what it was.
        """
        async with self.refresh_lock:  # parallel proposals judge concurrently
            merged = sorted(self.best_outcomes, key=lambda o: o.index)
            errored = [i for i, o in enumerate(merged) if o.error is not None]
            if not errored:
                return
            judged = self.judge_set
            again = await self.evaluate(self.best, [judged[i] for i in errored])
            for i, outcome in zip(errored, again.outcomes, strict=True):
                merged[i] = dataclasses.replace(outcome, index=i)
            before = self.best_score
            self.best_outcomes = tuple(merged)
            self.best_score = conservative_score(merged, self.parts.global_metric)
            self.parts.events.emit(
                "optimize.best_refreshed",
                rerun=len(errored),
                errors=again.errors,
                before=before,
                score=self.best_score,
            )

    def _note_errors(self, winner: ProposalRecord) -> None:
        """An accepted candidate above ``max_error_rate`` is kept (its score already
        counts its errors as failures, and it still beat the best), and said so."""
        total = len(self.judge_set)
        rate, limit = winner.full_errors / total, self.settings.max_error_rate
        if rate <= limit:
            return
        self.report.notes.append(
            f"step {winner.step}: accepted a candidate with {winner.full_errors} of {total} "
            f"examples errored ({rate:.0%}, above max_error_rate={limit:g}); its score "
            f"{winner.full_score:.4f} counts them as failures"
        )
        self.parts.events.emit(
            "optimize.accepted_with_errors",
            level="warning",
            step=winner.step,
            errors=winner.full_errors,
            error_rate=rate,
            max_error_rate=limit,
        )

    # -- the run ----------------------------------------------------------------------
    async def run(self) -> OptimizationResult:
        started = anyio.current_time()
        try:
            await self._run()
            if not self.report.stopped_reason:
                self.report.stopped_reason = "all batches done"
        except GlobalMetricError as exc:
            # the paid work is in the report: attach it, as TooManyErrorsError does
            self.report.stopped_reason = f"global metric: {exc.message}"
            self.report.wall_time = anyio.current_time() - started
            self.finish_report()
            exc.report = self.report
            raise
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
        if self.parts.program is None:
            return OptimizationResult(
                self.best, self.best_score, self.report.val_score, self.report
            )
        first = next(iter(self.prompts.values()))
        return OptimizationResult(
            first, self.best_score, self.report.val_score, self.report, dict(self.prompts)
        )

    def finish_report(self) -> None:
        meter = self.parts.meter
        if self.judge_set is self.parts.valset and not math.isnan(self.best_score):
            # judged on validation: the best prompt's val score is its decision score
            self.report.val_score = self.best_score
            self.val_measured = self.best_id()
        if self.pool is not None:
            self.report.pool = self.pool.records()
        if self.parts.valset is not None and self.val_measured != self.best_id():
            # the run stopped before the best prompt's validation run finished: a val
            # score is shown only for the prompt it measured
            self.report.val_score = None
            note = "val score not measured for the best prompt: the run stopped first"
            if note not in self.report.notes:
                self.report.notes.append(note)
        self.report.best_prompt = self.best.to_dict()
        self.report.best_score = self.best_score
        if self.parts.program is not None:
            self._program_report(self.parts.program)
        self.report.calls = dict(meter.calls)
        self.report.tokens = {
            m: [u.prompt_tokens, u.completion_tokens] for m, u in meter.usage.items()
        }
        self.report.cost = meter.cost
        if any(meter.hedges.values()):
            self.report.hedges = {
                "sent": sum(meter.hedges.values()),
                "won": sum(meter.hedges_won.values()),
                "tokens": {
                    m: [u.prompt_tokens, u.completion_tokens] for m, u in meter.hedge_usage.items()
                },
                "cost": meter.hedge_cost,
            }

    def _program_report(self, program: ProgramSetup) -> None:
        """Every prompt before and after, the steps that changed it, calls per stage."""
        self.report.best_prompt = next(iter(self.prompts.values())).to_dict()
        self.report.program = {
            "component": self.parts.component,
            "prompts": {
                name: {
                    "initial": self.initial_prompts[name].to_dict(),
                    "best": prompt.to_dict(),
                    "changed_at": list(self.changed_at[name]),
                }
                for name, prompt in self.prompts.items()
            },
            "stages": program.counts.to_dict(),
        }

    async def _run(self) -> None:
        await self._describe()
        if await self._start():
            return
        order = list(self.parts.trainset)  # a copy: the caller's list is never shuffled
        self.rng.shuffle(order)
        history: deque[HistoryEntry] = deque(maxlen=self.settings.history_size)
        # steps count from 1: step 0 is the initial prompt on the full set (charts, tables)
        for step, start in enumerate(range(0, len(order), self.settings.batch_size), start=1):
            batch = order[start : start + self.settings.batch_size]
            with span("step", **{"engine.step": step}):
                record = await self._step(step, batch, history)
                await self._close_step(record)
            if self.best_score >= MAX_SCORE:
                self.report.stopped_reason = "maximum score reached"
                return
            patience = self.settings.patience
            if patience is not None and self.stale_steps >= patience:
                self.report.stopped_reason = (
                    f"patience: {patience} steps without a validation improvement"
                )
                return

    async def _start(self) -> bool:
        """Score the initial prompt (the judged set, then val if not the same); True
        when there is nothing to do."""
        valset = self.parts.valset
        judged = self.judge_set
        full = await self.evaluate(self.best, judged)
        where = "validation" if judged is valset else "training"
        self.check_error_rate(full, f"the initial prompt on the {where} set")
        self.best_score = full.conservative_score
        self.best_outcomes = full.outcomes
        report = self.report
        report.initial_score = report.best_score = full.conservative_score
        report.initial_mean, report.initial_errors = full.score, full.errors
        if valset is not None:
            val = full if judged is valset else await self.evaluate(self.best, valset)
            report.initial_val_score = report.val_score = val.conservative_score
            self.val_measured = self.best_id()
            self.best_val = val.conservative_score
        if self.pool is not None:
            self.pool.add(self.pool_candidate(self.best, full, parents=(), step=-1))
        self.parts.events.emit("optimize.started", score=self.best_score, train=full.total)
        if self.best_score >= MAX_SCORE:
            report.stopped_reason = "initial prompt already at the maximum score"
            return True
        return False

    async def _close_step(self, record: StepRecord) -> None:
        # the record is in the report since the step began: a budget stop in the
        # validation run below leaves it there, its val score marked as not measured
        record.best_score = self.report.best_score = self.best_score
        valset = self.parts.valset
        if valset is not None:
            if self.judge_set is valset:
                val_score = self.best_score  # judged on it: no second run
            else:
                val_score = (await self.evaluate(self.best, valset)).conservative_score
            record.val_score = self.report.val_score = val_score
            self.val_measured = self.best_id()
            if val_score > self.best_val:
                self.best_val, self.stale_steps = val_score, 0
            else:
                self.stale_steps += 1
        if self.pool is not None:
            self.report.pool = self.pool.records()
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
        try:
            if self.task_description is None:
                sample_rng = random.Random(
                    f"{self.settings.seed}:describe"
                )  # apart from the shuffle
                sample = sample_rng.sample(p.trainset, min(3, len(p.trainset)))
                messages = describe_task_messages(self.initial, sample)
                self.task_description = await p.optimizer.ask_text(messages)
                self.report.generated_descriptions.append("task")
            if self.metric_description is None:
                messages = describe_metric_messages(_metric_source(p.metric))
                self.metric_description = await p.optimizer.ask_text(messages)
                self.report.generated_descriptions.append("metric")
        except ProviderError as exc:
            if exc.fatal:
                raise
            raise self.fatal_stage("describe", exc) from exc
        self.report.task_description = self.task_description
        self.report.metric_description = self.metric_description

    # -- one batch --------------------------------------------------------------------
    async def _step(
        self, step: int, batch: list[Example], history: deque[HistoryEntry]
    ) -> StepRecord:
        # the prompt this step improves: the best (greedy) or a front member (pareto)
        parent = self.pool.sample_parent() if self.pool is not None else None
        prompt = parent.prompt if parent is not None else self.best
        current = await self.evaluate(prompt, batch)
        record = StepRecord(
            step, [e.id for e in batch], current.conservative_score, self.best_score
        )
        record.batch_errors = current.errors
        self.report.steps.append(record)  # from now on: whatever stops the run, it is kept
        if self.settings.merge and await self._merge(step, batch, history, record):
            return record
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
        if self.parts.program is not None:
            prompt = await self._pick_stage(failed, feedback_history, record)
        proposer = Proposer(
            self,
            batch,
            current.conservative_score,
            history,
            current=prompt,
            parents=(parent.id,) if parent is not None else None,
            batch_key=self.key_of(prompt, current.outcomes),
        )
        for attempt in range(self.settings.max_proposals_per_step):
            with span("proposal", **{"engine.step": step, "engine.proposal.attempt": attempt}):
                with span("gradient", **{"engine.examples.failed": len(failed)}):
                    gradients = await self._gradients(prompt, failed, feedback_history, record)
                if not gradients:
                    break
                for example_id, text in gradients:
                    feedback_history.setdefault(example_id, []).append(text)
                feedback = tuple(text for _, text in gradients)
                try:
                    proposals = await proposer.attempt(step, attempt, feedback, record.proposals)
                except BudgetExceededError as exc:
                    undecided(record.proposals, attempt, exc.message)
                    raise
                winner = self._adopt(proposals, proposer)
                if winner is not None:
                    record.best_score = self.best_score
                    record.gradients = list(feedback)
                    self.parts.events.emit(
                        "optimize.accepted", step=step, attempt=attempt, score=self.best_score
                    )
                    self._note_errors(winner)
                    self.changed_at[self.stage].append(step)
                    break
        return record

    async def _pick_stage(
        self,
        failed: list[tuple[Example, Outcome]],
        feedback_history: dict[str, list[str]],
        record: StepRecord,
    ) -> Prompt:
        """A program's step: choose the prompt it updates (``self.stage``) and return
        it.  Round robin: the next in turn.  Blame: the one most gradients name (their
        first line), those gradients kept for the first attempt (``self.blamed``);
        none named: the next in turn."""
        names = list(self.prompts)
        self.stage = names[self.turn % len(names)]
        self.turn += 1
        if self.parts.component == "blame":
            gradients = await self._gradients(
                self.best, failed, feedback_history, record, blame=True
            )
            stage, self.blamed = blamed_stage(gradients, names)
            if stage is not None:
                self.stage = stage
        record.stage = self.stage
        self.parts.events.emit("optimize.stage", step=record.step, stage=self.stage)
        return self.best

    async def _merge(
        self, step: int, batch: list[Example], history: deque[HistoryEntry], record: StepRecord
    ) -> bool:
        """Pareto with ``merge=True``: when two front members share an ancestor (a pair
        not tried before), propose their merge first; True when it joined the front
        (the step is done, as after an accepted proposal)."""
        assert self.pool is not None
        pair = self.pool.merge_pair()
        if pair is None:
            return False
        ancestor = self.pool.common_ancestor(pair[0].id, pair[1].id)
        # the bar on the batch: the better of the two (ties: the first, the current)
        scored = [(await self.evaluate(c.prompt, batch), c) for c in pair]
        bar, first = max(scored, key=lambda s: s[0].conservative_score)
        merger = Proposer(
            self,
            batch,
            bar.conservative_score,
            history,
            current=pair[0].prompt,
            parents=(pair[0].id, pair[1].id),
            batch_key=self.key_of(first.prompt, bar.outcomes),
        )
        proposal = await merger.merge(step, pair, ancestor, record.proposals)
        if not self._adopt([proposal], merger):
            return False
        record.best_score = self.best_score
        self.parts.events.emit("optimize.accepted", step=step, attempt=-1, score=self.best_score)
        return True

    def _adopt(self, proposals: list[ProposalRecord], proposer: Proposer) -> ProposalRecord | None:
        """The attempt's winner, which the best prompt now is, or None.  Greedy: the best
        accepted proposal.  Pareto: the first that joined the front; the best prompt is
        then the pool's best mean on validation (it may be an older candidate)."""
        if self.pool is not None:
            winner = next((p for p in proposals if p.accepted), None)
            if winner is not None:
                best = self.pool.best()
                self.best, self.best_score = best.prompt, best.mean
            return winner
        winner = best_accepted(proposals, self.settings.tie_break)
        if winner is not None:
            assert winner.prompt is not None and winner.full_score is not None
            self.best = Prompt.from_dict(winner.prompt)
            self.best_score = winner.full_score
            self.best_outcomes = proposer.full_outcomes[winner.variant]
        return winner

    async def _gradients(
        self,
        prompt: Prompt,
        failed: list[tuple[Example, Outcome]],
        feedback_history: dict[str, list[str]],
        record: StepRecord,
        *,
        blame: bool = False,
    ) -> list[tuple[str, str]]:
        assert self.task_description is not None and self.metric_description is not None
        if self.blamed is not None:  # the blame pass made this attempt's gradients
            blamed, self.blamed = self.blamed, None
            return blamed
        program = dict(self.prompts) if self.parts.program is not None else None
        contexts = [
            GradientContext(
                task_description=self.task_description,
                metric_description=self.metric_description,
                prompt=prompt,
                example=example,
                prediction=outcome.prediction or "",
                result=outcome.result,  # type: ignore[arg-type]  # failed: scored ones only
                earlier_feedback=tuple(feedback_history.get(example.id, ())),
                trace=outcome.trace,
                program_prompts=program,
                stage="" if blame else self.stage,
                truncated=outcome.truncated,
            )
            for example, outcome in failed
        ]

        failures: list[ProviderError] = []

        async def feedback_on(ctx: GradientContext) -> str:
            try:
                text = await self.parts.gradient(ctx)
            except ProviderError as exc:
                if exc.fatal:
                    raise
                record.gradient_errors.append(f"{ctx.example.id}: {exc.message}")
                failures.append(exc)
                return ""
            if not isinstance(text, str):
                why = f"the gradient stage returned a {type(text).__name__}, not a str"
                record.gradient_errors.append(f"{ctx.example.id}: {why}")
                self.count_stage_error("gradient", why)
                return ""
            self.stage_worked.add("gradient")
            return escape_surrogates(text)

        texts = await run_all([lambda ctx=ctx: feedback_on(ctx) for ctx in contexts])  # type: ignore[misc]
        for exc in failures:  # all counted first: one call of them may have worked
            self.count_stage_error("gradient", exc.message)
        for exc in failures:
            self.check_stage("gradient", exc)
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
    prompt: Prompt | Mapping[str, Prompt],
    trainset: Iterable[Example],
    *,
    valset: Iterable[Example] | None = None,
    metric: Metric,
    model: ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint],
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
    cluster: EvaluationBackend | None = None,
    selection: Literal["greedy", "pareto"] = "greedy",
    accept_on: Literal["train", "val"] = "train",
    tie_break: Sequence[Literal["cost", "length"]] = (),
    patience: int | None = None,
    merge: bool = False,
    settings: TrainerSettings | None = None,
    program: Program | None = None,
    component: Component = "round_robin",
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
        max_error_rate: the share of errored examples (after retries) the initial
            prompt's training score may rest on; past it the run stops with
            `TooManyErrorsError`.  A candidate that beats the best with its errors
            counted as failures is accepted above it (noted in the report), never a stop.
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
        selection: ``"greedy"`` (default, the seed's rule: one best prompt) or
            ``"pareto"``: a pool of candidates, each scored on the whole validation set
            and kept while it is the best on at least one validation example; the next
            parent is drawn from that front in proportion to the examples it leads; the
            best mean on validation is returned.  Racing is off in this mode.
        accept_on: ``"train"`` (default, the seed's rule) or ``"val"``: the whole-set
            step judges a candidate on the validation set, and the best prompt on it is
            returned (racing stays exact: the same bound on another set).
        tie_break: second objectives for equal scores, e.g. ``("cost", "length")``:
            measured cost per example, then prompt tokens; the lower wins the tie (by
            default the older prompt keeps it).
        patience: stop after this many steps without a validation improvement.
        merge: pareto only: when two front members share an ancestor, a step may also
            propose their merge (one optimizer call), judged like any candidate.
        settings: the method's settings as one `TrainerSettings` value instead of the
            keywords above (batch_size ... merge).  It replaces their defaults; a
            keyword given alongside it with a value other than its default must agree
            with it, or `ConfigError` (no silent precedence).

        program: ``async def program(lm, example) -> answer`` (see `evaluate`):
            ``prompt`` is then a mapping of prompt name -> `Prompt` and ``model`` one
            adapter or a mapping of prompt name -> adapter.  The program's final answer
            is scored; each step updates one prompt, the others stay; acceptance is the
            method's rule on the program's score.  ``result.prompts`` has every prompt.
        component: a program's step updates ``"round_robin"`` (each prompt in turn) or
            ``"blame"`` (the prompt the gradient stage names as at fault, shown every
            failed example's whole trace).

    ``selection="pareto"``, ``accept_on="val"`` and ``patience`` need a ``valset``;
    without one they raise `ConfigError` before any call.
    """
    given = TrainerSettings(
        batch_size=batch_size,
        max_proposals_per_step=max_proposals_per_step,
        history_size=history_size,
        seed=seed,
        racing=racing,
        parallel_proposals=parallel_proposals,
        max_error_rate=max_error_rate,
        task_description=task_description,
        metric_description=metric_description,
        selection=selection,
        accept_on=accept_on,
        tie_break=tuple(tie_break) if isinstance(tie_break, list | tuple) else tie_break,  # type: ignore[arg-type]
        patience=patience,
        merge=merge,
    )
    settings = _settings_of(given, settings)
    setup = _program_of(prompt, model, program, limits, (settings, component, cluster))
    train, val = _checked_data(setup.prompts if setup else prompt, trainset, valset)
    needs = settings.needs_valset
    if needs is not None and not val:
        raise ConfigError(f"{needs}: pass a non-empty valset")
    prompt, task = await _task_of(prompt, model, setup, limits, train[0])
    opt = (
        task if optimizer_model is model else Endpoint.of(optimizer_model, limits=optimizer_limits)
    )
    opt_name = optimizer_model_name or prompt.model
    models = [p.model for p in setup.prompts.values()] if setup else [prompt.model]
    meter = BudgetMeter(budget, models=[*dict.fromkeys(models), opt_name])
    await check_metric(metric, train[0])  # a broken metric fails before the first paid call
    await preflight_global_metric(metric, global_metric, train)
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
        program=setup,
        component=component,
    )
    with run_span("optimize", task.name, **{"engine.train.size": len(train)}):
        return await _Trainer(prompt, settings, parts).run()


async def _task_of(
    prompt: Prompt | Mapping[str, Prompt],
    model: ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint],
    setup: ProgramSetup | None,
    limits: Limits | None,
    first: Example,
) -> tuple[Prompt, Endpoint]:
    """The prompt and endpoint that name the run (a program's first); a program's dry
    pass on the first example, so a bad ``lm`` call fails before the first paid call."""
    if setup is None:
        assert isinstance(prompt, Prompt) and not isinstance(model, Mapping)
        return prompt, Endpoint.of(model, limits=limits)
    await dry_run(setup, first)
    return next(iter(setup.prompts.values())), setup.first


def _program_of(
    prompt: Prompt | Mapping[str, Prompt],
    model: ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint],
    program: Program | None,
    limits: Limits | None,
    run: tuple[TrainerSettings, str, EvaluationBackend | None],
) -> ProgramSetup | None:
    """A program's checked setup (None for one prompt); `ConfigError` for what a
    program's run cannot do yet (the Pareto pool)."""
    settings, component, _cluster = run
    if program is None:
        if not isinstance(prompt, Prompt) or isinstance(model, Mapping):
            raise ConfigError("a mapping of prompts or models needs program= (the code)")
        return None
    check_component(component)
    if settings.selection != "greedy" or settings.merge:
        raise ConfigError('a program is optimized with selection="greedy" (one prompt per step)')
    if isinstance(prompt, Prompt):
        raise ConfigError("program= needs a mapping of prompt name -> Prompt")
    return program_setup(prompt, program, model, limits=limits)


def _settings_of(given: TrainerSettings, settings: TrainerSettings | None) -> TrainerSettings:
    """The run's settings: ``settings`` when passed, else the keywords (``given``).
    A keyword set away from its default that disagrees with ``settings`` is an error."""
    if settings is None:
        return given
    if not isinstance(settings, TrainerSettings):
        raise ConfigError(f"settings must be a TrainerSettings, got {type(settings).__name__}")
    conflicts = [
        f"{name}={getattr(given, name)!r} (settings has {getattr(settings, name)!r})"
        for name in (f.name for f in dataclasses.fields(TrainerSettings))
        if getattr(given, name) != getattr(DEFAULTS, name)
        and getattr(given, name) != getattr(settings, name)
    ]
    if conflicts:
        raise ConfigError("optimize() keywords conflict with settings: " + ", ".join(conflicts))
    return settings


async def preflight_global_metric(
    metric: Metric, global_metric: GlobalMetric | None, examples: Sequence[Example]
) -> None:
    """Check the global metric before anything is paid, on the per-example metric's
    results for the first few examples' expected answers (see `check_global_metric`):
    a naive F1 that divides by zero on a batch with no positives fails here, not after
    the whole training set was paid.  Skipped for metrics that opt out of the preflight
    (``preflight = False``: they cost calls)."""
    if is_mean(global_metric) or getattr(metric, "preflight", True) is False:
        return
    runner = MetricRunner(metric)
    results = []
    for example in examples[:4]:
        expected = "" if example.expected is None else render_value(example.expected)
        results.append(await runner(example, expected))
    check_global_metric(global_metric, results)


def _checked_data(
    prompt: Prompt | Mapping[str, Prompt],
    trainset: Iterable[Example],
    valset: Iterable[Example] | None,
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
