"""Results you can trust, round two (issue #18): the evaluation and the trainer.

No example vanishes, no number belongs to another prompt, and a stage, a proposal or a
global metric that misbehaves is a recorded failure or a named error, never a crash or a
run that quietly did nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import anyio
import pytest

from engine import (
    ApplyContext,
    BadRequestError,
    Budget,
    EngineError,
    Example,
    GlobalMetricError,
    GradientContext,
    MetricError,
    MetricResult,
    NoContentError,
    OptimizationResult,
    Outcome,
    Prompt,
    RunReport,
    StageError,
    TransientError,
    evaluate,
    optimize,
)
from engine.metrics import ExactMatch
from engine.testing import EventRecorder, ScriptedModel, ScriptedRequest

DESCRIPTIONS = {"task_description": "Say ok.", "metric_description": "ok scores 1."}


def _prompt(level: str) -> Prompt:
    return Prompt(
        [{"role": "system", "content": f"level {level}"}, {"role": "user", "content": "{q}"}],
        model="m",
    )


def _data(n: int) -> list[Example]:
    return [Example({"q": f"x{i}"}, "ok", id=f"x{i}") for i in range(n)]


def _number(request: ScriptedRequest) -> int:
    return int(request.messages[-1]["content"][1:])


def _level(request: ScriptedRequest) -> str:
    return request.messages[0]["content"].split()[-1]


async def _feedback(ctx: GradientContext) -> str:
    return "do better"


# -- 1. a CancelledError that is not a cancellation ------------------------------------


def _cancelled_on(bad: int) -> ScriptedModel:
    """A model whose answer to example ``bad`` raises CancelledError on its own (an inner
    task cancelled elsewhere), while nobody cancels the evaluation."""

    def answer(request: ScriptedRequest) -> str:
        if _number(request) == bad:
            raise asyncio.CancelledError("an inner task was cancelled elsewhere")
        return "ok"

    return ScriptedModel(answer)


async def _judge_cancelled_on_x2(example: Example, prediction: str) -> MetricResult:
    await anyio.lowlevel.checkpoint()
    if example.id == "x2":
        raise asyncio.CancelledError("the judge's inner task was cancelled elsewhere")
    return MetricResult(1.0 if prediction == "ok" else 0.0)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_stray_cancelled_error_from_the_model_is_an_error_outcome(concurrency: int) -> None:
    evaluation = await evaluate(
        _prompt("A"), _data(6), model=_cancelled_on(2), metric=ExactMatch(),
        concurrency=concurrency,
    )  # fmt: skip
    assert evaluation.completed == 6 and len(evaluation.outcomes) == 6
    assert evaluation.errors == 1 and evaluation.conservative_score == 5 / 6
    error = evaluation.outcomes[2].error
    assert error is not None and error.stage == "predict"
    assert "CancelledError" in error.message and "not being cancelled" in error.message


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_a_stray_cancelled_error_from_an_async_metric_is_an_error_outcome(
    concurrency: int,
) -> None:
    evaluation = await evaluate(
        _prompt("A"), _data(6), model=ScriptedModel(lambda r: "ok"),
        metric=_judge_cancelled_on_x2, concurrency=concurrency,
    )  # fmt: skip
    assert evaluation.completed == 6 and evaluation.errors == 1
    assert evaluation.conservative_score == 5 / 6
    error = evaluation.outcomes[2].error
    assert error is not None and error.stage == "metric" and "CancelledError" in error.message


async def test_a_stray_cancelled_error_inside_optimize_loses_no_example() -> None:
    result = await optimize(
        _prompt("A"),
        _data(6),
        metric=_judge_cancelled_on_x2,
        model=ScriptedModel(lambda r: "ok" if _number(r) % 2 else "bad"),
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=lambda ctx: _never(ctx),
        max_error_rate=0.5,
        max_proposals_per_step=1,
        **DESCRIPTIONS,
    )
    assert result.report.initial_errors == 1 and result.report.steps


async def _never(ctx: ApplyContext) -> Prompt:
    return ctx.prompt


async def test_a_real_cancellation_still_ends_the_evaluation_promptly() -> None:
    """The caller's own cancellation is not turned into error outcomes."""
    model = ScriptedModel(lambda r: "ok", latency=30.0)
    with anyio.move_on_after(0.2) as scope:
        await evaluate(_prompt("A"), _data(8), model=model, metric=ExactMatch())
    assert scope.cancelled_caught and model.stats.in_flight == 0


async def test_an_evaluation_that_would_return_short_raises_instead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The backstop: whatever loses an outcome (here a tally that drops one), evaluate
    raises an internal error naming the counts, never returns a short result."""
    from engine._tally import Tally

    add = Tally.add

    def dropping_x3(self: Tally, outcome: Outcome) -> None:
        if outcome.example_id != "x3":
            add(self, outcome)

    monkeypatch.setattr(Tally, "add", dropping_x3)
    with pytest.raises(EngineError, match=r"internal error: 4 outcomes for 5 examples"):
        await evaluate(_prompt("A"), _data(5), model=ScriptedModel(lambda r: "ok"),
                       metric=ExactMatch(), keep_outcomes=False)  # fmt: skip


# -- 2. the best score is never a stale number ---------------------------------------


class _FlakyOnce:
    """V0 is right on x0..x4, V1 on x3..x7: a tie at 5/8.  The very first request of
    V0 on x0 is refused (a permanent error, so not retried and not cached) once."""

    def __init__(self) -> None:
        self.right = {"0": {0, 1, 2, 3, 4}, "1": {3, 4, 5, 6, 7}}
        self.refused = False
        self.model = ScriptedModel(self._answer, name="flaky-once")

    def _answer(self, request: ScriptedRequest) -> str:
        level, number = _level(request), _number(request)
        if level == "0" and number == 0 and not self.refused:
            self.refused = True
            raise NoContentError("filtered once", finish_reason="content_filter")
        return "ok" if number in self.right[level] else "wrong"


async def _propose_v1(ctx: ApplyContext) -> Prompt:
    return _prompt("1")


async def test_a_tie_cannot_win_through_the_best_prompts_stale_error() -> None:
    task = _FlakyOnce()
    events = EventRecorder()
    result = await optimize(
        _prompt("0"),
        _data(8),
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_propose_v1,
        max_error_rate=0.2,
        max_proposals_per_step=1,
        on_event=events,
        **DESCRIPTIONS,
    )
    report = result.report
    assert report.initial_score == 0.5 and report.initial_errors == 1  # the stale number
    full = [p for p in report.proposals if p.full_score is not None or p.raced]
    assert full, "V1 must reach the full-set comparison for this test to mean anything"
    assert not any(p.accepted for p in report.proposals)
    assert result.prompt == _prompt("0") and result.score == 0.625  # refreshed, not 0.5
    assert report.best_score == 0.625
    refreshed = events.named("optimize.best_refreshed")
    assert [(e.data["before"], e.data["score"]) for e in refreshed] == [(0.5, 0.625)]


# -- 3. a budget stop: every paid proposal reported, no borrowed val score --------------


def _levels_model() -> ScriptedModel:
    """V0 is right on x0 and x1 only; V1 on everything (train and val ids alike)."""

    def answer(request: ScriptedRequest) -> str:
        return "ok" if _level(request) == "1" or _number(request) < 2 else "wrong"

    return ScriptedModel(answer, name="levels")


def _val(n: int) -> list[Example]:
    return [Example({"q": f"v{i}"}, "ok", id=f"v{i}") for i in range(n)]


async def _budget_run(train: int, max_calls: int) -> OptimizationResult:
    return await optimize(
        _prompt("0"),
        _data(train),
        valset=_val(4),
        metric=ExactMatch(),
        model=_levels_model(),
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_propose_v1,
        batch_size=4,
        max_proposals_per_step=1,
        budget=Budget(max_calls=max_calls),
        **DESCRIPTIONS,
    )


async def test_a_budget_stop_in_the_validation_run_keeps_the_step_and_borrows_no_score() -> None:
    """Calls: train 4 + val 4 + the candidate on the batch 4 (its full-set run is all
    cache hits), then the validation run of the accepted prompt, which the cap cuts."""
    result = await _budget_run(train=4, max_calls=13)
    report = result.report
    assert report.stopped_reason.startswith("budget")
    assert result.prompt == _prompt("1") and result.score == 1.0
    assert report.initial_val_score == 0.5
    assert result.val_score is None and report.val_score is None  # never V0's 0.5
    assert len(report.steps) == 1 and report.steps[0].val_score is None
    assert [p.accepted for p in report.proposals] == [True]
    markdown = report.to_markdown()
    assert "steps: 1, proposals: 1, accepted: 1" in markdown
    assert "val score: 0.500 -> **not measured**" in markdown


async def test_a_budget_stop_while_judging_keeps_the_paid_proposal_in_the_report() -> None:
    """Calls: train 8 + val 4 + the best on batch 0 (hits) + the candidate on it 4,
    then its full-set run (4 more), which the cap cuts: the proposal was paid for."""
    result = await _budget_run(train=8, max_calls=18)
    report = result.report
    assert report.stopped_reason.startswith("budget")
    assert result.prompt == _prompt("0") and result.val_score == report.val_score == 0.5
    assert len(report.steps) == 1 and len(report.proposals) == 1
    proposal = report.proposals[0]
    assert not proposal.accepted and proposal.batch_score == 1.0
    assert proposal.reason.startswith("not judged: the budget ran out")
    assert "steps: 1, proposals: 1, accepted: 0" in report.to_markdown()


# -- 4. a better candidate with a few errors ---------------------------------------------


def _filtered_model() -> ScriptedModel:
    """V0 is right on 5 of 20; V1 on 18, and a content filter refuses it the other 2."""

    def answer(request: ScriptedRequest) -> str:
        number = _number(request)
        if _level(request) == "0":
            return "ok" if number < 5 else "wrong"
        if number in (7, 11):
            raise NoContentError("filtered", finish_reason="content_filter")
        return "ok"

    return ScriptedModel(answer, name="filtered")


async def test_a_better_candidate_with_a_few_errors_is_accepted_and_the_run_goes_on() -> None:
    """Its conservative 0.9 (the 2 errors counted as failures) beats 0.25 whatever the
    errors would have scored: accepted, the run continues, the report says why."""
    events = EventRecorder()
    result = await optimize(
        _prompt("0"),
        _data(20),
        metric=ExactMatch(),
        model=_filtered_model(),
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_propose_v1,
        batch_size=10,
        max_proposals_per_step=1,
        on_event=events,
        **DESCRIPTIONS,
    )
    assert result.prompt == _prompt("1") and result.score == 0.9
    report = result.report
    assert len(report.steps) == 2 and report.stopped_reason == "all batches done"
    accepted = [p for p in report.proposals if p.accepted]
    assert len(accepted) == 1 and accepted[0].full_errors == 2
    assert any("max_error_rate" in note for note in report.notes)
    assert events.named("optimize.accepted_with_errors")


# -- 5. an optimizer that fails on every call --------------------------------------------


def _not_found(request: ScriptedRequest) -> str:
    raise BadRequestError("model 'gpt-4o-mnii' not found", status=404)


async def test_an_optimizer_that_fails_on_every_call_is_a_named_fatal_error() -> None:
    """A misspelled optimizer model: every gradient call is a 404.  Not a normal end."""
    with pytest.raises(StageError, match=r"gradient stage.*BadRequestError.*not found") as info:
        await optimize(
            _prompt("0"),
            _data(8),
            metric=ExactMatch(),
            model=_levels_model(),
            optimizer_model=ScriptedModel(_not_found, name="optimizer"),
            **DESCRIPTIONS,
        )
    assert info.value.stage == "gradient"
    report = info.value.report
    assert isinstance(report, RunReport) and report.stopped_reason.startswith("stage error")
    errors = report.steps[0].gradient_errors
    assert len(errors) >= 2 and report.stage_errors == {"gradient": len(errors)}


async def test_a_description_call_that_fails_is_named_with_the_report() -> None:
    with pytest.raises(StageError, match=r"describe stage") as info:
        await optimize(
            _prompt("0"),
            _data(8),
            metric=ExactMatch(),
            model=_levels_model(),
            optimizer_model=ScriptedModel(_not_found, name="optimizer"),
        )
    assert info.value.report is not None


async def test_a_transient_stage_error_is_counted_and_announced() -> None:
    failures = iter([True])

    async def flaky_gradient(ctx: GradientContext) -> str:
        if next(failures, False):
            raise TransientError("gateway timeout", status=504)
        return "do better"

    events = EventRecorder()
    result = await optimize(
        _prompt("0"),
        _data(8),
        metric=ExactMatch(),
        model=_levels_model(),
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=flaky_gradient,
        apply=_propose_v1,
        on_event=events,
        **DESCRIPTIONS,
    )
    assert result.prompt == _prompt("1")
    assert result.report.stage_errors == {"gradient": 1}
    [event] = events.named("optimize.stage_error")
    assert event.data["stage"] == "gradient" and "gateway timeout" in event.data["error"]


# -- 6. an invalid proposal is a failed attempt, never a crash ---------------------------


def _half_emoji(request: ScriptedRequest) -> str:
    if request.params.get("response_format") is None:
        return "do better"  # the gradient call
    return '{"messages": [{"role": "system", "content": "level 1 \\ud83d"}, ' \
        '{"role": "user", "content": "{q}"}]}'  # fmt: skip


async def _apply_with_braces(ctx: ApplyContext) -> Prompt:
    # LLM text with braces passed to Prompt: a ConfigError (an unknown placeholder)
    return Prompt(
        [{"role": "system", "content": "level 1 {like this}"}, {"role": "user", "content": "{q"}],
        model="m",
    )


async def _gradient_dict(ctx: GradientContext) -> str:
    return {"feedback": "do better"}  # type: ignore[return-value]


async def _optimize_with(**stages: object) -> OptimizationResult:
    return await optimize(
        _prompt("0"),
        _data(8),
        metric=ExactMatch(),
        model=_levels_model(),
        max_proposals_per_step=1,
        **{"optimizer_model": ScriptedModel(lambda r: "unused"), **DESCRIPTIONS, **stages},  # type: ignore[arg-type]
    )


async def test_a_proposal_with_half_an_emoji_is_a_rejected_proposal() -> None:
    result = await _optimize_with(optimizer_model=ScriptedModel(_half_emoji, name="opt"))
    proposals = result.report.proposals
    assert proposals and all(p.reason.startswith("invalid") for p in proposals)
    assert "surrogate" in proposals[0].reason
    assert result.prompt == _prompt("0")
    result.report.to_json().encode()  # the report itself stays writable


async def test_an_apply_stage_raising_config_error_is_a_failed_attempt() -> None:
    result = await _optimize_with(gradient=_feedback, apply=_apply_with_braces)
    proposals = result.report.proposals
    assert proposals and all(p.reason.startswith("invalid") for p in proposals)
    assert result.prompt == _prompt("0")


async def test_a_gradient_that_returns_a_dict_is_a_failed_call() -> None:
    result = await _optimize_with(gradient=_gradient_dict, apply=_propose_v1)
    assert result.prompt == _prompt("0") and not result.report.proposals
    errors = [e for s in result.report.steps for e in s.gradient_errors]
    assert errors and "dict" in errors[0]


# -- 7. a global metric that raises --------------------------------------------------------


def _yes_no_data(n: int) -> list[Example]:
    """x0..x3 are negatives ("no"), the rest positives ("yes")."""
    return [Example({"q": f"x{i}"}, "no" if i < 4 else "yes", id=f"x{i}") for i in range(n)]


def _match_with_trace(example: Example, prediction: str) -> MetricResult:
    positive, said = example.expected == "yes", prediction == "yes"
    trace = {"tp": int(positive and said), "fp": int(said and not positive),
             "fn": int(positive and not said)}  # fmt: skip
    return MetricResult(float(said == positive), trace=trace)


def _naive_f1(results: Sequence[MetricResult]) -> float:
    tp = sum(r.trace.get("tp", 0) for r in results)
    fp = sum(r.trace.get("fp", 0) for r in results)
    fn = sum(r.trace.get("fn", 0) for r in results)
    return 2 * tp / (2 * tp + fp + fn)  # ZeroDivisionError with no positive anywhere


async def test_a_global_metric_that_fails_on_a_one_sided_batch_fails_before_any_call() -> None:
    model = ScriptedModel(lambda r: "yes", name="yes")
    with pytest.raises(MetricError, match=r"global metric.*ZeroDivisionError") as info:
        await optimize(
            _prompt("0"), _yes_no_data(8), metric=_match_with_trace, global_metric=_naive_f1,
            model=model, optimizer_model=ScriptedModel(lambda r: "unused"), **DESCRIPTIONS,
        )  # fmt: skip
    assert model.calls == 0
    assert isinstance(info.value, GlobalMetricError)


async def test_a_global_metric_that_raises_later_ends_with_the_report_attached() -> None:
    def broken_on_batches(results: Sequence[MetricResult]) -> float:
        if len(results) == 2:  # a bug showing only on a batch of 2
            raise ZeroDivisionError("division by zero")
        return sum(r.score for r in results) / len(results)

    with pytest.raises(GlobalMetricError, match="ZeroDivisionError") as info:
        await optimize(
            _prompt("0"), _data(8), metric=ExactMatch(), global_metric=broken_on_batches,
            model=_levels_model(), optimizer_model=ScriptedModel(lambda r: "unused"),
            gradient=_feedback, apply=_propose_v1, batch_size=2, **DESCRIPTIONS,
        )  # fmt: skip
    report = info.value.report
    assert isinstance(report, RunReport) and report.stopped_reason.startswith("global metric")
    assert report.initial_score == 0.25


# -- 8. a metric that overruns its timeout without awaiting --------------------------------


async def _blocking_judge(example: Example, prediction: str) -> MetricResult:
    if example.id == "x1":
        time.sleep(0.4)  # noqa: ASYNC251 - blocks the loop on purpose: no timeout can cut it
    return MetricResult(1.0)


async def test_an_async_metric_that_blocks_past_its_timeout_is_timed_out() -> None:
    """Bounded from one side: it blocks 0.4 s against a 0.1 s timeout, so it overran
    whatever the machine's load."""
    evaluation = await evaluate(
        _prompt("A"), _data(3), model=ScriptedModel(lambda r: "ok"), metric=_blocking_judge,
        metric_timeout=0.1,
    )  # fmt: skip
    assert evaluation.errors == 1 and evaluation.scored == 2
    error = evaluation.outcomes[1].error
    assert error is not None and error.type == "MetricTimeoutError"
    assert "0.1s" in error.message


async def test_bad_requests_from_the_gradient_stage_are_failed_calls_not_the_end() -> None:
    """Examples too long for a small optimizer's context are 400s on their gradients
    alone: counted and announced, and the run goes on (a stage ends the run on 404s that
    repeat, as a misspelled model's do, and on 400s only when 20 calls never worked)."""
    raised: list[str] = []

    async def gradient(ctx: GradientContext) -> str:
        if len(raised) < 4:  # before any gradient worked
            raised.append(ctx.example.id)
            raise BadRequestError("maximum context length is 2048 tokens", status=400)
        return "answer ok"

    async def apply(ctx: ApplyContext) -> Prompt:
        return _prompt("1")

    result = await optimize(
        _prompt("0"),
        _data(8),
        metric=ExactMatch(),
        model=_levels_model(),
        optimizer_model=ScriptedModel(_not_found, name="optimizer"),
        gradient=gradient,
        apply=apply,
        batch_size=1,  # one example a batch: no success in the same batch hides a failure
        **DESCRIPTIONS,
    )
    assert result.score == 1.0 and result.report.stage_errors == {"gradient": 4}
