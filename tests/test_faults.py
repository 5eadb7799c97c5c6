"""Fault injection over loopback HTTP: every scenario ends with a check of every example.

The simulated provider runs the demo task (arithmetic model and coach) behind real
HTTP, so a whole `optimize` run can be compared with and without faults.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from adapters import arithmetic_examples
from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import Cache, Endpoint, Limits, RetryPolicy, TransientError, evaluate, optimize
from engine.metrics import ExactMatch, LLMJudge

from .conftest import echo_examples, qa_prompt
from .support import demo_answer

pytestmark = pytest.mark.slow

STORM_RETRY = RetryPolicy(max_attempts=40, base_delay=0.05, max_delay=1.0, timeout=5)


@pytest.mark.parametrize("retry_after", ["seconds", "ms", "none"])
async def test_429_storm_loses_nothing(retry_after: str) -> None:
    """Offered load far above the limit, headers withheld: every example still scores."""
    config = ServerConfig(rpm=1200, headers=False, retry_after=retry_after, latency_median=0.01)
    async with SimulatedServer(config) as server:
        async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=32)) as chat:
            endpoint = Endpoint(chat, retry=STORM_RETRY)
            result = await evaluate(
                qa_prompt(), echo_examples(120), model=endpoint, metric=ExactMatch()
            )
    stats = server.stats
    assert result.completed == 120 and result.errors == 0 and result.score == 1.0
    assert stats.rate_limited > 0 and stats.paid == 120
    # the shared pause gate keeps the storm from feeding itself
    assert stats.rate_limited < 3 * stats.paid


async def _optimize_over_http(config: ServerConfig) -> tuple[Any, SimulatedServer]:
    data = arithmetic_examples(40, seed=5)
    retry = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.2, timeout=1.0)
    async with SimulatedServer(config) as server:
        async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=16)) as chat:
            endpoint = Endpoint(chat, retry=retry)
            result = await optimize(
                qa_prompt(),
                data[:30],
                valset=data[30:],
                metric=ExactMatch(),
                model=endpoint,
                optimizer_model=endpoint,
                optimizer_model_name="coach",
                seed=3,
            )
    return result, server


async def test_mixed_faults_during_optimize_match_the_fault_free_run() -> None:
    """5% 500s, 2% hangs, 2% drops, 1% malformed at once: same prompt, score, decisions."""
    faulty, server = await _optimize_over_http(
        ServerConfig(
            answer=demo_answer,
            latency_median=0.005,
            error_rate=0.05,
            hang_rate=0.02,
            hang_seconds=30,
            drop_rate=0.02,
            malformed_rate=0.01,
            seed=11,
        )
    )
    clean, _ = await _optimize_over_http(ServerConfig(answer=demo_answer, latency_median=0.005))
    stats = server.stats
    assert min(stats.server_errors, stats.hangs, stats.drops, stats.malformed) > 0
    assert faulty.prompt == clean.prompt and faulty.score == clean.score == 1.0
    assert faulty.val_score == clean.val_score
    assert faulty.report.decisions() == clean.report.decisions()


async def test_outage_is_waited_out_within_the_deadline() -> None:
    """The provider goes fully down for 10 s mid-run: the run waits, resumes, finishes."""
    retry = RetryPolicy(max_attempts=100, base_delay=0.1, max_delay=2.0, timeout=5, deadline=40)
    async with SimulatedServer(ServerConfig(latency_median=0.02)) as server:
        async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=8)) as chat:
            endpoint = Endpoint(chat, retry=retry)
            started = time.monotonic()
            threading.Timer(0.3, server.take_down, args=(10,)).start()
            result = await evaluate(
                qa_prompt(), echo_examples(300), model=endpoint, metric=ExactMatch()
            )
            elapsed = time.monotonic() - started
    assert result.completed == 300 and result.errors == 0 and result.score == 1.0
    assert server.stats.outage_refusals > 0 and elapsed >= 10


async def test_outage_past_the_deadline_fails_clearly_and_keeps_what_was_paid(
    tmp_path: Path,
) -> None:
    retry = RetryPolicy(max_attempts=100, base_delay=0.1, max_delay=0.5, timeout=5, deadline=2)
    data = echo_examples(300)
    async with SimulatedServer(ServerConfig(latency_median=0.02)) as server:
        async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=8)) as chat:
            endpoint = Endpoint(chat, retry=retry)
            async with Cache.sqlite(str(tmp_path / "c.sqlite")) as cache:
                threading.Timer(0.3, server.take_down, args=(30,)).start()
                # the cause (HTTP 503) and the endpoint, by its host and port
                endpoint_label = server.base_url.removeprefix("http://")
                with pytest.raises(TransientError, match="503") as failure:
                    await evaluate(
                        qa_prompt(),
                        data,
                        model=endpoint,
                        metric=ExactMatch(),
                        cache=cache,
                        on_error="raise",
                    )
                assert endpoint_label in str(failure.value)
                paid_before = server.stats.paid
                assert 0 < paid_before < 300
            server.take_down(0)
            async with Cache.sqlite(str(tmp_path / "c.sqlite")) as cache:
                again = await evaluate(
                    qa_prompt(), data, model=endpoint, metric=ExactMatch(), cache=cache
                )
    assert again.completed == 300 and again.errors == 0
    assert again.cache_hits == paid_before and server.stats.paid == 300


async def test_slow_judge_metric_does_not_stall_predictions() -> None:
    """A judge on a second, slower endpoint: predictions finish long before the metrics."""

    def judge(messages: Sequence[Mapping[str, Any]], body: Mapping[str, Any]) -> str:
        return '{"score": 1, "feedback": "fine"}'

    async with (
        SimulatedServer(ServerConfig(latency_median=0.01)) as task_server,
        SimulatedServer(ServerConfig(latency_median=0.3, answer=judge)) as judge_server,
    ):  # type: ignore[arg-type]
        async with (
            OpenAIChat(base_url=task_server.base_url, limits=Limits(concurrency=8)) as task,
            OpenAIChat(base_url=judge_server.base_url, limits=Limits(concurrency=2)) as judge_chat,
        ):
            metric = LLMJudge(judge_chat, model_name="judge")
            started = time.monotonic()
            result = await evaluate(qa_prompt(), echo_examples(40), model=task, metric=metric)
            total = time.monotonic() - started
    assert result.completed == 40 and result.errors == 0 and result.score == 1.0
    last_prediction = max(task_server.stats.arrivals) - started
    assert total >= 40 * 0.3 / 2 * 0.8  # the judge's pace
    assert last_prediction < total / 3  # predictions were not held to it


async def test_cancelling_optimize_closes_every_connection_and_task() -> None:
    before = len(asyncio.all_tasks())
    async with SimulatedServer(ServerConfig(answer=demo_answer, latency_median=30.0)) as server:
        async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=8)) as chat:
            started = time.monotonic()
            with anyio.move_on_after(0.5):
                await optimize(
                    qa_prompt(),
                    arithmetic_examples(40),
                    metric=ExactMatch(),
                    model=chat,
                    optimizer_model=chat,
                    optimizer_model_name="coach",
                    task_description="t",
                    metric_description="m",
                )
            returned = time.monotonic() - started
            deadline = time.monotonic() + 1.0
            while server.stats.disconnects < 8 and time.monotonic() < deadline:
                await anyio.sleep(0.02)
        assert returned < 1.5
        assert server.stats.disconnects == server.stats.received == 8
        assert server.stats.in_flight == 0
    gc.collect()
    await asyncio.sleep(0)
    assert len(asyncio.all_tasks()) == before
