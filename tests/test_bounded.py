"""Bounded time under hostile providers, and safe to embed in a service (issue #10).

Tests that wait on the engine's own timers run on a fast-forwarded loop clock
(``@pytest.mark.looptime``): an hour of provider pause takes milliseconds and a loaded
machine cannot make them flaky; loop time is asserted, never wall time.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from engine import (
    Endpoint,
    EndpointUnreachableError,
    Example,
    Limits,
    QuotaExceededError,
    RateLimitedError,
    RetryPolicy,
    evaluate,
    register_secret,
)
from engine._context import current_emitter
from engine._events import Emitter
from engine._scoring import CPU_BOUND, MetricRunner, cpu_threads
from engine.metrics import ExactMatch
from engine.testing import EventRecorder, ScriptedModel, ScriptedRequest

from .conftest import echo_examples, echo_model, qa_prompt

ROOT = Path(__file__).resolve().parents[1]


def _loop_now() -> float:
    return asyncio.get_running_loop().time()


def _rate_limited_once(retry_after: float) -> ScriptedModel:
    """Every example's first attempt is a 429 asking for ``retry_after`` seconds."""

    def plan(request: ScriptedRequest) -> BaseException | None:
        if request.attempt == 1:
            return RateLimitedError(retry_after=retry_after, endpoint="scripted")
        return None

    return echo_model(faults=plan)


# -- every wait is bounded and visible -----------------------------------------------


@pytest.mark.looptime
async def test_a_retry_after_past_the_cap_fails_the_calls_at_once_naming_the_wait() -> None:
    model = _rate_limited_once(3600)
    endpoint = Endpoint(model, limits=Limits(concurrency=2))  # no deadline: the cap alone
    started = _loop_now()
    result = await evaluate(qa_prompt(), echo_examples(6), model=endpoint, metric=ExactMatch())
    assert _loop_now() - started < 1.0  # loop time: nothing waited for the hour
    assert result.errors == 6
    messages = [o.error.message for o in result.outcomes if o.error is not None]
    assert all("3600" in m and "max_retry_after" in m for m in messages), messages
    assert model.calls <= 2  # the first 429 closed the gate for everyone: no more sent


@pytest.mark.looptime
async def test_a_raised_cap_waits_out_the_pause_and_announces_it() -> None:
    model = _rate_limited_once(3600)
    endpoint = Endpoint(
        model,
        retry=RetryPolicy(max_retry_after=7200, base_delay=0.01),
        limits=Limits(concurrency=1),
    )
    recorder = EventRecorder()
    started = _loop_now()
    result = await evaluate(
        qa_prompt(), echo_examples(1), model=endpoint, metric=ExactMatch(), on_event=recorder
    )
    assert result.errors == 0 and result.score == 1.0
    assert _loop_now() - started >= 3600
    paused = recorder.named("endpoint.paused")
    assert (
        paused and paused[0].data["seconds"] == 3600 and paused[0].data["reason"] == "Retry-After"
    )
    assert len(str(paused[0].data["until"]).split(":")) == 3  # a wall-clock time HH:MM:SS


@pytest.mark.looptime
async def test_the_deadline_bounds_the_pause_gate_too() -> None:
    model = _rate_limited_once(30)  # under the 60 s cap, past the 10 s deadline
    endpoint = Endpoint(model, retry=RetryPolicy(deadline=10), limits=Limits(concurrency=1))
    started = _loop_now()
    result = await evaluate(qa_prompt(), echo_examples(3), model=endpoint, metric=ExactMatch())
    assert _loop_now() - started < 10
    assert result.errors == 3
    assert any("deadline" in o.error.message for o in result.outcomes if o.error is not None)


@pytest.mark.looptime
async def test_a_metric_that_never_returns_is_a_metric_error_outcome() -> None:
    async def hangs(example: Example, prediction: str) -> float:
        await anyio.sleep_forever()
        return 1.0

    hangs.preflight = False  # type: ignore[attr-defined]
    started = _loop_now()
    result = await evaluate(
        qa_prompt(), echo_examples(4), model=echo_model(), metric=hangs, metric_timeout=60
    )
    assert 60 <= _loop_now() - started < 61
    assert result.errors == 4 and result.completed == 4
    error = result.outcomes[0].error
    assert error is not None and error.stage == "metric" and "within 60s" in error.message


# -- fail fast when nothing can succeed ----------------------------------------------


async def test_an_exhausted_quota_stops_the_run_at_once() -> None:
    def plan(request: ScriptedRequest) -> BaseException | None:
        return QuotaExceededError(
            "You exceeded your current quota", endpoint="scripted", status=429
        )

    model = echo_model(faults=plan)
    endpoint = Endpoint(model, limits=Limits(concurrency=4))
    with pytest.raises(QuotaExceededError, match="quota"):
        await evaluate(qa_prompt(), echo_examples(40), model=endpoint, metric=ExactMatch())
    assert model.calls <= 4  # no retries: the first answers end it


@pytest.mark.looptime
async def test_an_endpoint_nothing_listens_at_opens_the_breaker() -> None:
    def refused(request: ScriptedRequest) -> BaseException | None:
        return ConnectionRefusedError(111, "Connection refused")

    model = echo_model(faults=refused)
    endpoint = Endpoint(model, limits=Limits(concurrency=8))
    started = _loop_now()
    with pytest.raises(EndpointUnreachableError, match="connection refused") as info:
        await evaluate(qa_prompt(), echo_examples(40), model=endpoint, metric=ExactMatch())
    assert _loop_now() - started < 5
    # never answered: FIRST_CONTACT failures are enough (the threshold once it answered)
    assert "3 connection failures in a row" in str(info.value)
    assert model.calls <= 3 + 8  # the threshold, plus what was already in flight
    assert endpoint.statistics().breaker_open


@pytest.mark.looptime
async def test_the_breaker_lets_calls_through_again_after_its_cool_down() -> None:
    down = True

    def plan(request: ScriptedRequest) -> BaseException | None:
        return ConnectionRefusedError(111, "Connection refused") if down else None

    model = echo_model(faults=plan)
    endpoint = Endpoint(model, retry=RetryPolicy(circuit_breaker=3), limits=Limits(concurrency=1))
    with pytest.raises(EndpointUnreachableError):
        await evaluate(qa_prompt(), echo_examples(5), model=endpoint, metric=ExactMatch())
    down = False
    with pytest.raises(EndpointUnreachableError):  # still open: fails without a call
        calls = model.calls
        await evaluate(qa_prompt(), echo_examples(1), model=endpoint, metric=ExactMatch())
    assert model.calls == calls
    await anyio.sleep(31)
    result = await evaluate(qa_prompt(), echo_examples(2), model=endpoint, metric=ExactMatch())
    assert result.score == 1.0 and not endpoint.statistics().breaker_open


# -- one limiter per adapter, however it is shared ---------------------------------------


async def test_concurrent_evaluations_of_one_adapter_share_its_endpoint() -> None:
    """Two evaluate() calls given the same bare adapter hold one concurrency budget."""
    model = ScriptedModel(
        lambda r: r.messages[-1]["content"], latency=0.01, limits=Limits(concurrency=4)
    )

    async def run(prefix: str) -> None:
        await evaluate(qa_prompt(), echo_examples(40, prefix), model=model, metric=ExactMatch())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a")
        tg.start_soon(run, "b")
    assert model.stats.max_in_flight == 4  # not 8: one endpoint, one limiter
    assert Endpoint.of(model) is Endpoint.of(model)


def test_conflicting_limits_for_a_shared_adapter_are_an_error() -> None:
    model = echo_model()
    Endpoint.of(model, limits=Limits(concurrency=4))
    with pytest.raises(ValueError, match="already runs under"):
        Endpoint.of(model, limits=Limits(concurrency=8))


# -- sync metrics do not block the loop ----------------------------------------------


async def test_a_slow_sync_metric_runs_in_threads_not_on_the_loop() -> None:
    def slow(example: Example, prediction: str) -> float:
        time.sleep(0.2)
        return 1.0

    slow.preflight = False  # type: ignore[attr-defined]
    model = echo_model(latency=0.01)
    endpoint = Endpoint(model, retry=RetryPolicy(timeout=0.5), limits=Limits(concurrency=8))
    started = time.monotonic()
    result = await evaluate(qa_prompt(), echo_examples(40), model=endpoint, metric=slow)
    wall = time.monotonic() - started
    assert result.score == 1.0 and result.errors == 0
    assert endpoint.statistics().timeouts == 0 and model.calls == 40  # no spurious retries
    assert wall < 2.0  # 40 x 0.2 s would be 8 s on the loop


async def test_a_fast_plain_metric_runs_on_the_loop_with_no_thread_hop() -> None:
    loop_thread, seen = threading.get_ident(), set()

    def plain(example: Example, prediction: str) -> float:
        seen.add(threading.get_ident())
        return 1.0 if prediction == example.expected else 0.0

    result = await evaluate(qa_prompt(), echo_examples(30), model=echo_model(), metric=plain)
    assert result.score == 1.0 and seen == {loop_thread}


async def test_a_plain_metric_that_proves_slow_moves_to_threads_and_says_so_once() -> None:
    loop_thread, threads = threading.get_ident(), []

    def slow(example: Example, prediction: str) -> float:
        threads.append(threading.get_ident())
        time.sleep(0.003)  # over the 1 ms threshold, whatever the machine's load
        return 1.0

    recorder = EventRecorder()
    result = await evaluate(
        qa_prompt(), echo_examples(20), model=echo_model(), metric=slow, on_event=recorder
    )
    assert result.score == 1.0 and result.errors == 0
    # the check before the first call and the first example: timed on the loop, two
    # slow calls in a row; every later call in a worker thread
    assert threads[:2] == [loop_thread, loop_thread] and loop_thread not in threads[2:]
    (switch,) = recorder.named("metric.threaded")
    assert switch.data["threshold_ms"] == 1.0 and switch.data["metric"].endswith("slow")


class _MetricClocks:
    """The two clocks the metric runner reads, moved only by the test's metrics: a
    call's wall time and its CPU time are what the test says, whatever the load."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def perf_counter(self) -> float:
        return self.wall

    def thread_time(self) -> float:
        return self.cpu


@pytest.mark.parametrize("cpu_share", [0.9, 0.1])
async def test_a_cpu_bound_metric_moves_to_as_many_threads_as_cores_and_a_waiting_one_keeps_all(
    monkeypatch: pytest.MonkeyPatch, cpu_share: float
) -> None:
    """Many threads of a CPU-bound metric only take turns at the GIL (and the loop's
    thread waits behind them): the second slow call, 90% on the CPU, caps the threads
    at cores + 1; one that mostly waits (10%) keeps the 16 it was given."""
    import engine._scoring as scoring

    clocks = _MetricClocks()
    monkeypatch.setattr(scoring, "time", clocks)

    def metric(example: Example, prediction: str) -> float:
        clocks.wall += 0.004  # over the 1 ms threshold
        clocks.cpu += 0.004 * cpu_share
        return 1.0

    runner = MetricRunner(metric, threads=16)
    recorder = EventRecorder()
    token = current_emitter.set(Emitter(recorder))
    try:
        for example in echo_examples(4):
            assert (await runner(example, example.expected)).score == 1.0
    finally:
        current_emitter.reset(token)
    assert runner.threads is not None and not runner.inline
    (switch,) = recorder.named("metric.threaded")
    expected = cpu_threads() if cpu_share > CPU_BOUND else 16
    assert runner.threads.total_tokens == expected and switch.data["threads"] == expected
    assert switch.data["cpu_bound"] is (cpu_share > CPU_BOUND)


async def test_a_cpu_bound_metric_never_gets_more_threads_than_asked() -> None:
    def busy(example: Example, prediction: str) -> float:
        started = time.thread_time()
        while time.thread_time() - started < 0.003:  # 3 ms of this thread's CPU
            pass
        return 1.0

    runner = MetricRunner(busy, threads=1)
    for example in echo_examples(3):
        await runner(example, example.expected)
    assert runner.threads is not None and runner.threads.total_tokens == 1


async def test_one_slow_call_alone_does_not_move_a_fast_metric_to_threads() -> None:
    loop_thread, seen, calls = threading.get_ident(), set(), []

    def mostly_fast(example: Example, prediction: str) -> float:
        seen.add(threading.get_ident())
        calls.append(example.id)
        if len(calls) % 5 == 0:
            time.sleep(0.003)  # a hiccup: the GIL held by another thread, the OS
        return 1.0

    recorder = EventRecorder()
    result = await evaluate(
        qa_prompt(), echo_examples(20), model=echo_model(), metric=mostly_fast, on_event=recorder
    )
    assert result.score == 1.0 and seen == {loop_thread}
    assert recorder.named("metric.threaded") == []


async def test_a_metric_that_says_inline_true_or_false_is_never_moved() -> None:
    loop_thread, on_loop, off_loop = threading.get_ident(), [], []

    def slow_but_inline(example: Example, prediction: str) -> float:
        on_loop.append(threading.get_ident() == loop_thread)
        time.sleep(0.002)
        return 1.0

    def fast_but_threaded(example: Example, prediction: str) -> float:
        off_loop.append(threading.get_ident() != loop_thread)
        return 1.0

    slow_but_inline.inline = True  # type: ignore[attr-defined]
    fast_but_threaded.inline = False  # type: ignore[attr-defined]
    recorder = EventRecorder()
    for metric in (slow_but_inline, fast_but_threaded):
        result = await evaluate(
            qa_prompt(), echo_examples(6), model=echo_model(), metric=metric, on_event=recorder
        )
        assert result.score == 1.0
    assert len(on_loop) == len(off_loop) == 7 and all(on_loop) and all(off_loop)
    assert recorder.named("metric.threaded") == []


async def test_an_async_metric_that_never_suspends_pays_no_cancel_scope() -> None:
    deadlines = []

    async def plain(example: Example, prediction: str) -> float:
        deadlines.append(anyio.current_effective_deadline())
        return 1.0 if prediction == example.expected else 0.0

    result = await evaluate(
        qa_prompt(), echo_examples(10), model=echo_model(), metric=plain, metric_timeout=30
    )
    assert result.score == 1.0 and deadlines == [math.inf] * 11  # no per-call deadline


async def test_an_async_metric_that_suspends_keeps_its_values_errors_and_deadline() -> None:
    deadlines = []

    async def judge(example: Example, prediction: str) -> float:
        await anyio.lowlevel.checkpoint()
        deadlines.append(anyio.current_effective_deadline())
        await anyio.sleep(0.001)
        if example.id == "e1":
            raise ValueError("the judge refused")
        return 1.0

    result = await evaluate(
        qa_prompt(), echo_examples(5), model=echo_model(), metric=judge, metric_timeout=30
    )
    assert (result.scored, result.errors, result.score) == (4, 1, 1.0)
    error = result.outcomes[1].error
    assert error is not None and error.type == "ValueError" and "refused" in error.message
    assert deadlines == [math.inf] * 6  # no scope per call: one watcher for them all


@pytest.mark.looptime
async def test_one_watcher_times_out_suspended_metrics_inside_their_own_cancel_scopes() -> None:
    cleaned = []

    async def judge(example: Example, prediction: str) -> float:
        await anyio.lowlevel.checkpoint()  # suspended before the engine could scope it
        try:
            with anyio.fail_after(1000):  # the metric's own scope, open when the deadline hits
                await anyio.sleep_forever()
        finally:
            cleaned.append(example.id)
        return 1.0

    judge.preflight = False  # type: ignore[attr-defined]
    started = _loop_now()
    result = await evaluate(
        qa_prompt(), echo_examples(6), model=echo_model(), metric=judge, metric_timeout=5
    )
    assert 5 <= _loop_now() - started < 6
    assert result.errors == 6 and sorted(cleaned) == [f"e{i}" for i in range(6)]
    error = result.outcomes[0].error
    assert error is not None and error.type == "MetricTimeoutError"


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_async_metric_that_answers_at_once_is_scored_where_it_was_predicted(
    streamed: bool,
) -> None:
    predicted_in: dict[str, object] = {}
    scored_in: dict[str, object] = {}

    def answer(request: ScriptedRequest) -> str:
        text = request.messages[-1]["content"]
        predicted_in[text] = asyncio.current_task()
        return text

    async def plain(example: Example, prediction: str) -> float:
        scored_in[prediction] = asyncio.current_task()
        return 1.0 if prediction == example.expected else 0.0

    data = echo_examples(12)
    examples = (e for e in data) if streamed else data
    result = await evaluate(qa_prompt(), examples, model=ScriptedModel(answer), metric=plain)
    assert result.score == 1.0 and result.completed == 12
    # no hand-off to a metric worker: the task that predicted an example scored it
    assert all(scored_in[text] is task for text, task in predicted_in.items())


@pytest.mark.looptime
async def test_an_async_metric_fast_in_the_check_but_hanging_later_still_times_out() -> None:
    async def fickle(example: Example, prediction: str) -> float:
        if example.id != "e0":
            await anyio.sleep_forever()
        return 1.0

    started = _loop_now()
    result = await evaluate(
        qa_prompt(), echo_examples(4), model=echo_model(), metric=fickle, metric_timeout=20
    )
    assert 20 <= _loop_now() - started < 21
    assert (result.scored, result.errors) == (1, 3)


# -- secrets redacted by value -------------------------------------------------------


async def test_a_key_of_no_known_shape_is_redacted_where_a_gateway_echoes_it() -> None:
    key = "Zq8vN3kT0pLm5Wc2Hx7Rb4Yd9Gf1Js6A"  # no sk- prefix, no known shape
    register_secret(key)

    def echo_key(request: ScriptedRequest) -> BaseException | None:
        from engine import BadRequestError

        return BadRequestError(f"invalid api key {key} for this deployment", status=400)

    recorder = EventRecorder()
    result = await evaluate(
        qa_prompt(),
        echo_examples(2),
        model=echo_model(faults=echo_key),
        metric=ExactMatch(),
        on_event=recorder,
    )
    text = json.dumps([o.to_dict() for o in result.outcomes]) + repr(recorder.events)
    assert key not in text and "[REDACTED]" in text


def test_the_cli_redacts_a_shapeless_key_from_outcomes_and_stderr(tmp_path: Path) -> None:
    key = "Pk4mX9bQ2wE7rT1yU6iO3aS8dF5gH0jL"
    (tmp_path / "data.jsonl").write_text(
        json.dumps({"id": "r1", "question": "q", "expected": "q"}) + "\n"
    )
    (tmp_path / "run.toml").write_text(
        """
[prompt]
messages = [{ role = "user", content = "{question}" }]
model = "m"
[data]
train = "data.jsonl"
[model]
adapter = "tests.key_echo:KeyEchoModel"
api_key_env = "SHAPELESS_KEY"
[output]
dir = "out"
"""
    )
    env = {**os.environ, "SHAPELESS_KEY": key}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", str(tmp_path / "run.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # the example errored
    outcomes = (tmp_path / "out" / "evaluation_train.jsonl").read_text()
    assert "invalid key" in outcomes and "[REDACTED]" in outcomes
    for text in (outcomes, done.stdout, done.stderr):
        assert key not in text


# -- quiet as a library --------------------------------------------------------------

_QUIET = """
import anyio
from engine import Example, Prompt, evaluate, RetryPolicy, Endpoint, TransientError
from engine.metrics import ExactMatch
from engine.testing import ScriptedModel, transient_faults

async def main():
    prompt = Prompt([{"role": "user", "content": "{q}"}], model="m")
    data = [Example({"q": f"x{i}"}, f"x{i}") for i in range(30)]
    model = ScriptedModel(lambda r: r.messages[-1]["content"], faults=transient_faults(0.3))
    endpoint = Endpoint(model, retry=RetryPolicy(base_delay=0.001))
    await evaluate(prompt, data, model=endpoint, metric=ExactMatch(), progress_interval=0)

%s
anyio.run(main)
"""


def test_a_library_prints_nothing_unless_the_host_asks() -> None:
    quiet = subprocess.run(
        [sys.executable, "-c", _QUIET % ""], capture_output=True, text=True, check=True
    )
    assert quiet.stdout == "" and quiet.stderr == ""
    asked = subprocess.run(
        [sys.executable, "-c", _QUIET % "import logging; logging.basicConfig(level=logging.DEBUG)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "evaluation.finished" in asked.stderr and "call.retry" in asked.stderr


# -- over real HTTP --------------------------------------------------------------------


async def test_a_server_that_is_not_listening_stops_the_run_in_seconds() -> None:
    """40 examples against a closed port: the breaker opens after 10 refused connections
    and the run stops with the URL and the cause (it took 324 s before the breaker)."""
    from adapters.openai_chat import OpenAIChat
    from adapters.simulated_server import SimulatedServer

    with SimulatedServer() as server:
        url = server.base_url  # a port that was just freed: nothing listens there now
    started = time.monotonic()
    async with OpenAIChat(base_url=url, limits=Limits(concurrency=8)) as chat:
        with pytest.raises(EndpointUnreachableError) as info:
            await evaluate(qa_prompt(), echo_examples(40), model=chat, metric=ExactMatch())
    assert time.monotonic() - started < 5
    assert f"cannot reach {url}: connection refused" in str(info.value)


@pytest.mark.slow
async def test_two_evaluations_and_an_optimization_share_one_adapters_budget() -> None:
    """One OpenAIChat(limits=Limits(rpm=3000)) used by two evaluations and one
    optimization at once: the provider (RPM 3000) sees at most 1% 429s and the combined
    work reaches at least 0.95 of the rate bound (it saw 44% 429s when each evaluation
    built its own limiter)."""
    from adapters import ArithmeticCoach
    from adapters.openai_chat import OpenAIChat
    from adapters.simulated_server import ServerConfig, SimulatedServer
    from engine import optimize

    config = ServerConfig(rpm=3000, latency_median=0.05, latency_sigma=0.3, seed=3)
    async with SimulatedServer(config) as server:
        async with OpenAIChat(
            base_url=server.base_url, limits=Limits(rpm=3000, concurrency=64)
        ) as chat:
            started = time.monotonic()
            async with anyio.create_task_group() as tg:
                for prefix in ("a", "b"):
                    tg.start_soon(
                        lambda p=prefix: evaluate(
                            qa_prompt(), echo_examples(400, p), model=chat, metric=ExactMatch()
                        )
                    )
                tg.start_soon(
                    lambda: optimize(
                        qa_prompt("Repeat the question."),
                        echo_examples(200, "o"),
                        metric=lambda e, p: 1.0 if p == e.expected else 0.0,
                        model=chat,
                        optimizer_model=ArithmeticCoach(),
                        task_description="echo",
                        metric_description="exact",
                    )
                )
            wall = time.monotonic() - started
    stats = server.stats
    assert stats.rate_limited <= 0.01 * stats.received
    bound = stats.paid / (3000 / 60)  # the time the provider's rate needs for this work
    assert bound / wall >= 0.95, (bound, wall, stats.paid)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_calls": True},
        {"max_calls": 2.5},
        {"max_tokens": 1000.0},
        {"max_tokens": 0},
        {"max_cost": True},
        {"max_cost": "5"},
        {"max_cost": float("nan")},
        {"max_cost": float("inf")},
    ],
)
def test_a_budget_that_is_not_a_count_or_an_amount_is_a_config_error(
    kwargs: dict[str, object],
) -> None:
    """``Budget(max_calls=True)`` was a budget of one call, ``2.5`` of three."""
    from engine import Budget, ConfigError

    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"Budget.{name} must be a positive"):
        Budget(**kwargs)  # type: ignore[arg-type]


def test_a_budget_of_counts_and_dollars_is_accepted() -> None:
    from engine import Budget

    budget = Budget(max_calls=10, max_tokens=5000, max_cost=1)
    assert (budget.max_calls, budget.max_tokens, budget.max_cost) == (10, 5000, 1)
    assert Budget(max_cost=0.25).max_cost == 0.25
