"""Results you can trust: no decision, cache hit or score that silently lies (issue #9)."""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from engine import (
    ApplyContext,
    BadRequestError,
    Budget,
    Cache,
    Completion,
    ConfigError,
    Endpoint,
    Example,
    GradientContext,
    MetricResult,
    NoContentError,
    Prompt,
    TooManyErrorsError,
    evaluate,
    optimize,
)
from engine.metrics import ExactMatch, LLMJudge, mean
from engine.testing import EventRecorder, ScriptedModel, ScriptedRequest

from .conftest import echo_examples, echo_model, qa_prompt

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


class _AOrB:
    """Prompt A answers even ids right and odd ids wrong; prompt B answers even ids
    right and makes the provider reject odd ids (400): an error where A is wrong."""

    def __init__(self) -> None:
        self.model = ScriptedModel(self._answer, name="ab")

    def _answer(self, request: ScriptedRequest) -> str:
        level = request.messages[0]["content"].split()[-1]
        even = _number(request) % 2 == 0
        if level == "B" and not even:
            raise BadRequestError("this prompt cannot be answered for this input", status=400)
        return "ok" if even else "wrong"


async def _always_propose_b(ctx: ApplyContext) -> Prompt:
    return _prompt("B")


async def _feedback(ctx: GradientContext) -> str:
    return "do better"


async def test_a_candidate_cannot_win_by_erroring() -> None:
    """Erroring exactly where it would be wrong gives B a mean of 1.0 over what it
    scored; decided conservatively (errors are failures) it ties A and is rejected."""
    task = _AOrB()
    result = await optimize(
        _prompt("A"),
        _data(8),
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_always_propose_b,
        max_proposals_per_step=1,
        **DESCRIPTIONS,
    )
    assert result.prompt == _prompt("A") and result.score == 0.5
    proposals = result.report.proposals
    assert proposals and not any(p.accepted for p in proposals)
    assert all(p.reason == "no batch improvement" for p in proposals)
    assert all(p.batch_errors > 0 and p.batch_score is not None for p in proposals)
    assert all(p.batch_score <= 0.5 for p in proposals)  # type: ignore[operator]
    assert result.report.stopped_reason == "all batches done"


async def test_the_evaluation_reports_both_scores_and_the_error_count() -> None:
    evaluation = await evaluate(_prompt("B"), _data(8), model=_AOrB().model, metric=ExactMatch())
    assert evaluation.score == 1.0  # the mean over the 4 scored examples
    assert evaluation.conservative_score == 0.5  # the 4 errors counted as failures
    assert evaluation.errors == 4 and evaluation.scored == 4
    assert evaluation.to_dict()["conservative_score"] == 0.5


async def test_racing_bound_counts_errors_as_failures() -> None:
    """B alternates right and errored.  After x5 (three errors, two examples left) the
    conservative bound is 5/8 = 0.625: a must_beat of 0.625 is out of reach and the
    evaluation is cut there.  Leaving errors out of the denominator, the bound would
    still be (3 + 2) / 5 = 1.0 and nothing would be cut."""
    evaluation = await evaluate(
        _prompt("B"),
        _data(8),
        model=_AOrB().model,
        metric=ExactMatch(),
        must_beat=0.625,
        concurrency=1,
    )
    assert evaluation.stopped_early and evaluation.completed == 6
    assert evaluation.upper_bound == 0.625


async def test_too_many_errors_on_the_best_prompt_stops_the_run() -> None:
    """The initial prompt's training score resting on 25% errored examples is noise."""
    with pytest.raises(TooManyErrorsError, match=r"4 of 8 examples \(50%\) failed") as info:
        await optimize(
            _prompt("B"),
            _data(8),
            metric=ExactMatch(),
            model=_AOrB().model,
            optimizer_model=ScriptedModel(lambda r: "unused"),
            gradient=_feedback,
            apply=_always_propose_b,
            **DESCRIPTIONS,
        )
    assert "max_error_rate=0.05" in str(info.value) and "BadRequestError" in str(info.value)
    report = info.value.report
    assert report is not None and report.stopped_reason.startswith("error rate")  # type: ignore[attr-defined]


async def test_a_raised_error_rate_lets_the_run_go_on() -> None:
    result = await optimize(
        _prompt("B"),
        _data(8),
        metric=ExactMatch(),
        model=_AOrB().model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_always_propose_b,
        max_error_rate=0.5,
        max_proposals_per_step=1,
        **DESCRIPTIONS,
    )
    assert result.report.initial_errors == 4 and result.report.initial_mean == 1.0
    assert result.report.initial_score == 0.5 == result.score


# -- the global metric ---------------------------------------------------------------


def _min_score(results: Sequence[MetricResult]) -> float:
    return min(r.score for r in results)


async def test_global_metric_sees_results_in_dataset_order() -> None:
    seen: list[list[float]] = []

    def first_and_record(results: Sequence[MetricResult]) -> float:
        seen.append([r.score for r in results])
        return results[0].score

    data = _data(6)
    model = ScriptedModel(
        lambda r: "ok" if _number(r) % 2 else "no", latency=lambda rng: rng.random() / 100
    )
    result = await evaluate(
        _prompt("A"), data, model=model, metric=ExactMatch(), global_metric=first_and_record
    )
    assert seen[0] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.score == 0.0


async def test_global_metric_and_its_conservative_form() -> None:
    result = await evaluate(
        _prompt("B"), _data(8), model=_AOrB().model, metric=ExactMatch(), global_metric=_min_score
    )
    assert result.score == 1.0  # min over the scored examples
    assert result.conservative_score == 0.0  # the errored ones count as failures


async def test_racing_is_off_with_a_global_metric_and_the_report_says_so() -> None:
    result = await optimize(
        _prompt("A"),
        _data(8),
        metric=ExactMatch(),
        model=_AOrB().model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=_always_propose_b,
        global_metric=_min_score,
        max_error_rate=1.0,
        max_proposals_per_step=1,
        **DESCRIPTIONS,
    )
    assert any("racing off" in note and "_min_score" in note for note in result.report.notes)
    assert result.report.raced_evaluations == 0
    with pytest.raises(ConfigError, match="racing"):
        await evaluate(
            _prompt("A"),
            _data(2),
            model=echo_model(),
            metric=ExactMatch(),
            must_beat=0.5,
            global_metric=_min_score,
        )


# -- cache keys ----------------------------------------------------------------------


async def test_fixing_a_label_is_never_a_stale_hit() -> None:
    cache, model = Cache(), echo_model()
    wrong = [Example({"question": "item 0"}, "item 9", id="e0")]
    right = [Example({"question": "item 0"}, "item 0", id="e0")]
    first = await evaluate(qa_prompt(), wrong, model=model, metric=ExactMatch(), cache=cache)
    second = await evaluate(qa_prompt(), right, model=model, metric=ExactMatch(), cache=cache)
    assert first.score == 0.0 and second.score == 1.0
    assert second.calls == 0  # the prediction is the same question: a hit


def _make_at_least(threshold: int) -> Any:
    def at_least(example: Example, prediction: str) -> float:
        return 1.0 if len(prediction) >= threshold else 0.0

    at_least.inline = True  # type: ignore[attr-defined]
    return at_least


def _longer_than(example: Example, prediction: str, *, limit: int) -> float:
    return 1.0 if len(prediction) > limit else 0.0


class _Longer:
    inline = True

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def __call__(self, example: Example, prediction: str) -> float:
        return 1.0 if len(prediction) > self.limit else 0.0


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (_make_at_least(1), _make_at_least(10)),  # closure cells
        (functools.partial(_longer_than, limit=1), functools.partial(_longer_than, limit=10)),
        (_Longer(1), _Longer(10)),  # instance attributes
    ],
    ids=["closure", "partial", "instance"],
)
async def test_metrics_with_other_captured_state_never_share_results(low: Any, high: Any) -> None:
    """Same code, different state: different results, both computed, on one cache."""
    cache, data = Cache(), echo_examples(4)  # predictions "item 0".. are 6 characters
    one = await evaluate(qa_prompt(), data, model=echo_model(), metric=low, cache=cache)
    two = await evaluate(qa_prompt(), data, model=echo_model(), metric=high, cache=cache)
    assert one.score == 1.0 and two.score == 0.0


async def test_integral_state_is_one_identity() -> None:
    """threshold=1 and threshold=1.0 score alike: one cached result."""
    cache, calls = Cache(), []

    class Counted:
        inline = True

        def __init__(self, limit: float) -> None:
            self.limit = limit

        def __call__(self, example: Example, prediction: str) -> float:
            calls.append(1)
            return 1.0

    data = echo_examples(3)
    await evaluate(
        qa_prompt(), data, model=echo_model(), metric=Counted(1), cache=cache, validate=False
    )
    await evaluate(
        qa_prompt(), data, model=echo_model(), metric=Counted(1.0), cache=cache, validate=False
    )
    assert len(calls) == 3


async def test_a_metric_with_state_of_no_canonical_form_is_not_cached_and_says_so() -> None:
    lock = threading.Lock()  # its repr is its address: no canonical form

    def locked(example: Example, prediction: str) -> float:
        with lock:
            return 1.0

    locked.inline = True  # type: ignore[attr-defined]
    cache, recorder, data = Cache(), EventRecorder(), echo_examples(3)
    for _ in range(2):
        result = await evaluate(
            qa_prompt(), data, model=echo_model(), metric=locked, cache=cache, on_event=recorder
        )
        assert result.score == 1.0
    assert len(recorder.named("metric.uncacheable")) == 1  # said once
    assert not [k for k in cache.store._data if k.startswith("m:")]  # type: ignore[attr-defined]


async def test_two_endpoints_serving_one_model_name_do_not_share_answers() -> None:
    cache, data = Cache(), echo_examples(3)
    a = ScriptedModel(lambda r: "from a", name="server-a")
    b = ScriptedModel(lambda r: "from b", name="server-b")
    first = await evaluate(qa_prompt(), data, model=a, metric=ExactMatch(), cache=cache)
    second = await evaluate(qa_prompt(), data, model=b, metric=ExactMatch(), cache=cache)
    assert first.calls == 3 and second.calls == 3 and b.calls == 3
    # sharing on purpose: the same namespace
    shared = Endpoint(b, namespace="scripted:server-a")
    third = await evaluate(qa_prompt(), data, model=shared, metric=ExactMatch(), cache=cache)
    assert third.calls == 0 and b.calls == 3


class _Ladder:
    """An adapter that learned to send json_object instead of json_schema."""

    name = "ladder"
    cache_identity = "ladder"

    def __init__(self) -> None:
        self.mode = "json_schema"
        self.calls = 0

    def response_format_sent(self, requested: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"type": self.mode} if self.mode != "json_schema" else dict(requested)

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        self.calls += 1
        sent = self.response_format_sent(params["response_format"])
        return Completion(
            '{"a": 1}', sent_response_format=sent if self.mode != "json_schema" else None
        )


async def test_the_format_actually_sent_is_part_of_the_key() -> None:
    prompt = qa_prompt().replace(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    )
    cache, model, data = Cache(), _Ladder(), echo_examples(2)
    metric = ExactMatch()
    await evaluate(prompt, data, model=model, metric=metric, cache=cache)
    await evaluate(prompt, data, model=model, metric=metric, cache=cache)
    assert model.calls == 2  # same format: hits
    model.mode = "json_object"
    await evaluate(prompt, data, model=model, metric=metric, cache=cache)
    assert model.calls == 4  # another question now: asked again, not answered from json_schema


def test_integral_floats_hash_alike() -> None:
    base = [{"role": "user", "content": "{q}"}]
    assert (
        Prompt(base, model="m", temperature=0).hash == Prompt(base, model="m", temperature=0.0).hash
    )
    assert (
        Prompt(base, model="m", params={"max_tokens": 256}).hash
        == Prompt(base, model="m", params={"max_tokens": 256.0}).hash
    )
    assert (
        Prompt(base, model="m", temperature=0.5).hash != Prompt(base, model="m", temperature=0).hash
    )


# -- answers that are not text -------------------------------------------------------


async def test_an_answer_without_text_is_an_error_outcome_never_an_empty_prediction() -> None:
    def refuse(request: ScriptedRequest) -> str:
        raise NoContentError(
            "the model refused: I can't help with that", finish_reason="stop", refusal="no"
        )

    result = await evaluate(
        qa_prompt(), echo_examples(3), model=ScriptedModel(refuse), metric=ExactMatch()
    )
    assert result.errors == 3 and result.scored == 0 and math.isnan(result.score)
    error = result.outcomes[0].error
    assert error is not None and error.type == "NoContentError" and "refused" in error.message
    assert result.outcomes[0].prediction is None


# -- small lies ----------------------------------------------------------------------


def test_the_mean_of_nothing_is_not_zero() -> None:
    assert math.isnan(mean([]))


async def test_judge_calls_are_charged_to_the_run_and_reported() -> None:
    judge_model = ScriptedModel(lambda r: '{"score": 1, "feedback": "fine"}', name="judge")
    judge = LLMJudge(judge_model, model_name="judge-model")
    model = ScriptedModel(lambda r: "ok")
    result = await optimize(
        _prompt("A"),
        _data(4),
        metric=judge,
        model=model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        budget=Budget(max_calls=1000),
        **DESCRIPTIONS,
    )
    assert result.report.calls.get("judge-model") == 4 == judge_model.calls
    assert re.search(r"judge-model: 4", result.report.to_markdown())
