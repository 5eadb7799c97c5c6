"""evaluate(): nothing lost, errors never scored, racing exact, cancellation prompt."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Iterable, Iterator

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters import ArithmeticModel, OpenAIChat, ScriptedModel, ScriptedRequest, transient_faults
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import (
    AuthenticationError,
    Cache,
    ConfigError,
    Endpoint,
    Evaluation,
    Example,
    Limits,
    MetricError,
    MetricResult,
    PermanentError,
    Prompt,
    RetryPolicy,
    TransientError,
    evaluate,
)
from engine._options import EvaluationOptions
from engine.cli._main import _truncated
from engine.metrics import ExactMatch
from engine.report import RunReport
from engine.stages import (
    APPLY_ROOM_TOKENS,
    DESCRIBE_MAX_TOKENS,
    GRADIENT_MAX_TOKENS,
    GradientContext,
    LLMGradient,
    apply_max_tokens,
)
from engine.testing import EventRecorder

from .conftest import echo_examples, echo_model, qa_prompt

FAST_RETRY = RetryPolicy(max_attempts=10, base_delay=0.001, max_delay=0.01, timeout=5)


async def test_transient_failures_are_retried_and_nothing_is_lost() -> None:
    """1,000 examples with 20% injected failures: 1,000 outcomes, the clean run's score."""
    data = echo_examples(1000)
    # score depends on the example so a lost or zeroed one would move the mean
    metric = lambda ex, pred: 1.0 if int(ex.id[1:]) % 3 else 0.5  # noqa: E731
    clean = await evaluate(qa_prompt(), data, model=echo_model(), metric=metric)
    faulty_model = echo_model(faults=transient_faults(0.2, seed=1))
    endpoint = Endpoint(faulty_model, retry=FAST_RETRY, limits=Limits(concurrency=64))
    faulty = await evaluate(qa_prompt(), data, model=endpoint, metric=metric)
    assert faulty.completed == len(faulty.outcomes) == 1000
    assert faulty.errors == 0
    assert faulty.score == clean.score
    assert faulty.retries > 100  # the faults really happened
    assert faulty.calls == faulty_model.calls == 1000 + faulty.retries
    assert [o.example_id for o in faulty.outcomes] == [e.id for e in data]


async def test_permanent_failures_are_recorded_errors_never_zeros() -> None:
    """Failed examples are error outcomes with their cause, left out of the mean."""

    def fail_some(request: ScriptedRequest) -> BaseException | None:
        number = int(request.messages[-1]["content"].split()[-1])
        return PermanentError("model refused", status=422) if number % 10 == 0 else None

    model = echo_model(faults=fail_some)
    result = await evaluate(qa_prompt(), echo_examples(100), model=model, metric=ExactMatch())
    assert result.completed == 100 and result.errors == 10 and result.scored == 90
    assert result.score == 1.0  # zeros for the 10 failures would give 0.9
    failed = [o for o in result.outcomes if o.error is not None]
    assert {o.example_id for o in failed} == {f"e{i}" for i in range(0, 100, 10)}
    assert all(o.result is None and o.error.type == "PermanentError" for o in failed)  # type: ignore[union-attr]
    assert "model refused" in failed[0].error.message  # type: ignore[union-attr]


async def test_exhausted_retries_record_the_cause_and_attempts() -> None:
    model = echo_model(faults=lambda r: TransientError("still down", status=503))
    endpoint = Endpoint(model, retry=RetryPolicy(max_attempts=3, base_delay=0.001))
    result = await evaluate(qa_prompt(), echo_examples(5), model=endpoint, metric=ExactMatch())
    assert result.errors == 5 and model.calls == 15
    error = result.outcomes[0].error
    assert error is not None and error.attempts == 3 and "still down" in error.message
    assert result.score != result.score  # NaN: nothing was scored, so no score at all


async def test_on_error_raise_fails_on_first_error_unwrapped() -> None:
    model = echo_model(faults=lambda r: PermanentError("nope", status=422))
    with pytest.raises(PermanentError, match="nope"):
        await evaluate(
            qa_prompt(), echo_examples(50), model=model, metric=ExactMatch(), on_error="raise"
        )


async def test_authentication_error_is_fatal_whatever_the_policy() -> None:
    model = echo_model(faults=lambda r: AuthenticationError("bad key", status=401))
    with pytest.raises(AuthenticationError):
        await evaluate(qa_prompt(), echo_examples(50), model=model, metric=ExactMatch())
    assert model.calls <= 32  # the workers that were already in flight, nothing more


async def test_metric_exception_is_recorded_with_stage() -> None:
    def flaky(ex: Example, pred: str) -> float:
        if ex.id == "e3":
            raise KeyError("boom")
        return 1.0

    result = await evaluate(qa_prompt(), echo_examples(10), model=echo_model(), metric=flaky)
    bad = [o for o in result.outcomes if o.error is not None]
    assert [(o.example_id, o.error.stage) for o in bad] == [("e3", "metric")]  # type: ignore[union-attr]
    assert bad[0].prediction == "item 3"  # the paid prediction is kept


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("empty", "empty"),
        ("duplicate", "duplicate example id 'e1'"),
        ("missing", r"lack placeholder\(s\) \['question'\]"),
        ("extra", "not placeholders"),
        ("score", "1.7"),
        ("not_example", "not an engine.Example"),
    ],
)
async def test_bad_input_fails_before_any_call(case: str, match: str) -> None:
    model = echo_model()
    data: list[object] = list(echo_examples(5))
    metric = ExactMatch()
    if case == "empty":
        data = []
    elif case == "duplicate":
        data.append(Example({"question": "again"}, "x", id="e1"))
    elif case == "missing":
        data.append(Example({"q": "typo"}, "x", id="z"))
    elif case == "extra":
        data.append(Example({"question": "a", "other": 1}, "x", id="z"))
    elif case == "score":
        metric = lambda ex, pred: 1.7  # type: ignore[assignment]  # noqa: E731
    else:
        data.append({"question": "a dict"})
    with pytest.raises((ConfigError, MetricError), match=match):
        await evaluate(qa_prompt(), data, model=model, metric=metric)  # type: ignore[arg-type]
    assert model.calls == 0


async def test_streaming_iterable_is_validated_row_by_row() -> None:
    model = echo_model()

    def rows() -> object:
        yield from echo_examples(3)
        yield Example({"wrong": 1}, "x", id="bad")

    with pytest.raises(ConfigError, match="#3"):
        await evaluate(qa_prompt(), rows(), model=model, metric=ExactMatch(), concurrency=1)  # type: ignore[arg-type]
    result = await evaluate(qa_prompt(), iter(echo_examples(50)), model=model, metric=ExactMatch())
    assert result.completed == 50 and result.total == 50


def _score_pattern_model(scores: dict[str, float]) -> tuple[ScriptedModel, object]:
    model = echo_model()

    def metric(ex: Example, pred: str) -> float:
        return scores[ex.id]

    return model, metric


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scores=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=40),
    must_beat=st.sampled_from([0.0, 0.2, 0.5, 0.75, 0.9, 1.0]),
    concurrency=st.integers(1, 8),
)
def test_racing_gives_the_full_evaluation_decision(
    scores: list[float], must_beat: float, concurrency: int
) -> None:
    """must_beat accepts exactly when the full mean beats it; cut only when it rejects,
    with fewer calls; never cut once every example is in (that is a full evaluation)."""
    data = echo_examples(len(scores))
    by_id = {e.id: s for e, s in zip(data, scores, strict=True)}

    async def run() -> None:
        model, metric = _score_pattern_model(by_id)
        full = await evaluate(
            qa_prompt(), data, model=model, metric=metric, concurrency=concurrency
        )  # type: ignore[arg-type]
        raced_model, metric = _score_pattern_model(by_id)
        raced = await evaluate(
            qa_prompt(),
            data,
            model=raced_model,
            metric=metric,
            must_beat=must_beat,  # type: ignore[arg-type]
            concurrency=concurrency,
        )
        accepted_raced = not raced.stopped_early and raced.conservative_score > must_beat
        assert (full.conservative_score > must_beat) == accepted_raced
        if raced.stopped_early:
            assert raced.upper_bound is not None and raced.upper_bound <= must_beat
            assert raced.completed < raced.total and raced_model.calls <= model.calls
        else:
            assert raced.score == full.score and raced_model.calls == model.calls

    asyncio.run(run())


async def test_racing_cuts_calls_and_cancels_in_flight() -> None:
    """A hopeless candidate stops early; its in-flight calls are cancelled."""
    model = echo_model(latency=0.01)
    data = echo_examples(400)
    result = await evaluate(
        qa_prompt(), data, model=model, metric=lambda e, p: 0.0, must_beat=0.5, concurrency=16
    )
    assert result.stopped_early and result.upper_bound is not None and result.upper_bound <= 0.5
    assert model.calls < 250 and model.stats.in_flight == 0


async def test_cancellation_is_prompt_and_leaves_no_task() -> None:
    """Cancelling evaluate() returns at once (not after the 30 s calls) and leaves no task
    behind.  The bound leaves a loaded CI machine room; a second is typical."""
    model = echo_model(latency=30.0)
    before = len(asyncio.all_tasks())
    elapsed = 0.0
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            await evaluate(qa_prompt(), echo_examples(500), model=model, metric=ExactMatch())

        tg.start_soon(run)
        # cancel once every worker's call is in flight (a loaded machine validates slowly)
        while model.stats.in_flight < 32:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        tg.cancel_scope.cancel()
    elapsed = time.monotonic() - started
    assert elapsed < 3
    gc.collect()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before
    assert model.stats.in_flight == 0 and model.stats.cancelled == 32


async def test_progress_events_and_outcome_stream() -> None:
    recorder = EventRecorder()
    streamed: list[str] = []
    result = await evaluate(
        qa_prompt(),
        echo_examples(30),
        model=echo_model(latency=0.005),
        metric=ExactMatch(),
        on_event=recorder,
        on_outcome=lambda o: streamed.append(o.example_id),
        keep_outcomes=False,
        progress_interval=0.0,
        concurrency=4,
    )
    assert result.outcomes == () and sorted(streamed) == sorted(f"e{i}" for i in range(30))
    names = recorder.names()
    assert names[0] == "evaluation.started" and names[-1] == "evaluation.finished"
    assert "evaluation.progress" in names
    assert recorder.named("evaluation.finished")[0].data["done"] == 30


async def test_global_metric_and_racing_conflict() -> None:
    with pytest.raises(ConfigError, match="racing"):
        await evaluate(
            qa_prompt(),
            echo_examples(3),
            model=echo_model(),
            metric=ExactMatch(),
            global_metric=lambda rs: 0.5,
            must_beat=0.1,
        )
    res = await evaluate(
        qa_prompt(),
        echo_examples(3),
        model=echo_model(),
        metric=ExactMatch(),
        global_metric=lambda rs: min(r.score for r in rs),
    )
    assert res.score == 1.0


async def test_better_prompt_scores_better_on_the_demo_task(data: list[Example]) -> None:
    """The scripted demo model rewards the instructions that fix its habits."""
    model = ArithmeticModel()
    weak = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=Cache())
    strong_prompt = qa_prompt("Work carefully and reply with only the number, in digits.")
    strong = await evaluate(strong_prompt, data, model=model, metric=ExactMatch())
    assert weak.score < 0.5 and strong.score == 1.0


async def test_prompt_params_and_response_format_reach_the_model() -> None:
    model = echo_model()
    p = Prompt(
        [{"role": "user", "content": "{question}"}],
        model="m",
        temperature=0.3,
        params={"max_tokens": 7},
        response_format={"type": "json_object"},
    )
    await evaluate(p, echo_examples(1), model=model, metric=lambda e, x: MetricResult(1.0))
    assert model.requests[0].params == {
        "model": "m",
        "temperature": 0.3,
        "max_tokens": 7,
        "response_format": {"type": "json_object"},
    }


@pytest.mark.slow
async def test_memory_stays_flat_over_100000_streamed_examples() -> None:
    """Streaming (a generator in, outcomes out through on_outcome, none kept): the peak
    of Python allocations at 10^5 examples is within 1.2x of the peak at 10^4, so what
    is alive scales with the concurrency, not the dataset (tracemalloc, not RSS)."""
    import tracemalloc

    def rows(n: int) -> Iterator[Example]:
        for i in range(n):
            yield Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}")

    async def peak(n: int) -> int:
        seen = 0

        def count(outcome: object) -> None:
            nonlocal seen
            seen += 1

        model = ScriptedModel(lambda r: r.messages[-1]["content"], keep_requests=False)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        await evaluate(
            qa_prompt(),
            rows(n),
            model=model,
            metric=ExactMatch(),
            limits=Limits(concurrency=64),
            keep_outcomes=False,
            on_outcome=count,
        )
        assert seen == n
        return tracemalloc.get_traced_memory()[1] - base

    tracemalloc.start()
    try:
        small, large = await peak(10_000), await peak(100_000)
    finally:
        tracemalloc.stop()
    assert large <= 1.2 * small, (small, large)


class _RecordingBackend:
    """An `EvaluationBackend` that runs the evaluation here and keeps what it was given."""

    def __init__(self) -> None:
        self.received: list[EvaluationOptions] = []

    async def run_evaluation(
        self, prompt: Prompt, examples: Iterable[Example], options: EvaluationOptions
    ) -> Evaluation:
        self.received.append(options)
        given = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        return await evaluate(prompt, examples, **given)


async def test_a_backend_gets_one_options_value_checked_once_at_the_entry() -> None:
    """`evaluate(..., cluster=backend)` hands the backend one frozen options value with
    every keyword as given; a bad ``on_error`` fails at the entry, before any backend."""
    backend = _RecordingBackend()
    data = echo_examples(5)
    result = await evaluate(
        qa_prompt(), data, model=echo_model(), metric=ExactMatch(), cluster=backend,
        concurrency=2, metric_threads=3, keep_outcomes=False, on_error="raise",
    )  # fmt: skip
    assert result.completed == 5 and result.score == 1.0
    [options] = backend.received
    assert (options.concurrency, options.metric_threads) == (2, 3)
    assert (options.keep_outcomes, options.on_error) == (False, "raise")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.concurrency = 4  # type: ignore[misc]
    with pytest.raises(ConfigError, match="on_error"):
        await evaluate(
            qa_prompt(), data, model=echo_model(), metric=ExactMatch(), cluster=backend,
            on_error="ignore",  # type: ignore[arg-type]
        )  # fmt: skip
    assert len(backend.received) == 1


# -- answers cut at the length cap are visible (issue #26) ----------------------------


def _rambling(messages: object, params: object) -> str:
    return "and then " * 200  # a model that never stops: every answer hits max_tokens


async def test_answers_cut_at_the_length_cap_are_counted_fresh_and_cached() -> None:
    """A server whose answers run to ``max_tokens``: every cut answer is counted in
    ``Evaluation.truncated`` and its outcome says so, read back from the cache too;
    answers that fit are not counted."""
    async with (
        SimulatedServer(ServerConfig(answer=_rambling)) as server,
        OpenAIChat(base_url=server.base_url) as chat,
    ):
        cache = Cache()
        capped = qa_prompt(params={"max_tokens": 16})
        first = await evaluate(
            capped, echo_examples(12), model=chat, metric=ExactMatch(), cache=cache
        )
        again = await evaluate(
            capped, echo_examples(12), model=chat, metric=ExactMatch(), cache=cache
        )
        roomy = qa_prompt(params={"max_tokens": 4096})
        whole = await evaluate(roomy, echo_examples(5), model=chat, metric=ExactMatch())
    assert first.truncated == 12 and all(o.truncated for o in first.outcomes)
    assert again.cache_hits == 12 and again.truncated == 12
    assert whole.truncated == 0
    assert first.to_dict()["truncated"] == 12


def test_the_report_and_progress_line_say_answers_were_cut() -> None:
    """The run report warns with the count and the remedy; so does the CLI's line."""
    report = RunReport(
        initial_prompt={},
        best_prompt={},
        initial_score=0.5,
        best_score=0.5,
        answers=40,
        truncated=12,
    )
    message = (
        "12 of 40 answers cut at the length limit: set max_tokens or tell the prompt to be brief"
    )
    assert message in report.to_markdown()
    assert message in report.to_html()
    assert message in _truncated({"truncated": 12, "done": 40})
    assert _truncated({"truncated": 0, "done": 40}) == ""


def test_the_gradient_stage_is_told_an_answer_was_cut() -> None:
    """The default gradient prompt says the prediction was cut at the length limit."""
    example = echo_examples(1)[0]
    context = GradientContext(
        task_description="t",
        metric_description="m",
        prompt=qa_prompt(),
        example=example,
        prediction="and then and then",
        result=MetricResult(0.0),
        earlier_feedback=(),
        truncated=True,
    )
    stage = LLMGradient(Endpoint(echo_model()), model="demo")
    text = stage.messages(context)[1]["content"]
    assert "cut at the length limit" in text
    whole = stage.messages(dataclasses.replace(context, truncated=False))[1]["content"]
    assert "cut at the length limit" not in whole


async def test_the_engines_own_calls_cap_their_length_and_the_cap_can_be_changed() -> None:
    """Gradient, apply and description calls send the documented default max_tokens
    (a model without a cap would write to its context's end); a caller's own wins."""
    model = echo_model()
    endpoint = Endpoint(model)
    example = echo_examples(1)[0]
    context = GradientContext(
        task_description="t",
        metric_description="m",
        prompt=qa_prompt(),
        example=example,
        prediction="x",
        result=MetricResult(0.0),
        earlier_feedback=(),
    )
    await LLMGradient(endpoint, model="demo")(context)
    await LLMGradient(endpoint, model="demo").ask_text([{"role": "user", "content": "d"}])
    await LLMGradient(endpoint, model="demo", max_tokens=77)(context)
    sent = [r.params.get("max_tokens") for r in model.requests]
    assert sent == [GRADIENT_MAX_TOKENS, DESCRIBE_MAX_TOKENS, 77]
    assert apply_max_tokens(qa_prompt()) > APPLY_ROOM_TOKENS
