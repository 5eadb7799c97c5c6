"""End to end against a real local LLM (llama.cpp server, Gemma 3 270M).

Start it with ``scripts/llm_server.sh start`` and set ``LLM_BASE_URL`` (``.ci/run`` does
both).  A 270M base model often answers nonsense: these tests assert the engine
survives and reports it (every example has an outcome, invalid proposals recorded with
their raw text, no crash), not that the score rises.
"""

from __future__ import annotations

import math
import os

import pytest

from adapters.openai_chat import OpenAIChat
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate, optimize
from engine.metrics import Contains

BASE_URL = os.environ.get("LLM_BASE_URL")
pytestmark = [
    pytest.mark.llm,
    pytest.mark.slow,
    pytest.mark.skipif(not BASE_URL, reason="set LLM_BASE_URL (scripts/llm_server.sh start)"),
]

MODEL = "gemma-3-270m"
DATA = [
    Example({"country": "France"}, "Paris", id="fr"),
    Example({"country": "Japan"}, "Tokyo", id="jp"),
    Example({"country": "Italy"}, "Rome", id="it"),
    Example({"country": "Egypt"}, "Cairo", id="eg"),
]


def prompt() -> Prompt:
    return Prompt(
        [{"role": "user", "content": "What is the capital of {country}? Answer with one word."}],
        model=MODEL,
        temperature=0.0,
        params={"max_tokens": 24},
    )


def endpoint(chat: OpenAIChat) -> Endpoint:
    # llama-cpp-python's server answers one request at a time
    return Endpoint(
        chat, limits=Limits(concurrency=1), retry=RetryPolicy(max_attempts=3, timeout=120)
    )


async def test_evaluate_against_the_real_llm() -> None:
    async with OpenAIChat(base_url=BASE_URL) as chat:
        result = await evaluate(prompt(), DATA, model=endpoint(chat), metric=Contains())
    assert result.completed == len(DATA) == len(result.outcomes)
    for outcome in result.outcomes:
        assert (outcome.result is None) != (outcome.error is None)
        if outcome.result is not None:
            assert isinstance(outcome.prediction, str)
    assert result.calls >= len(DATA)


async def test_short_optimize_survives_the_real_llm() -> None:
    async with OpenAIChat(base_url=BASE_URL) as chat:
        ep = endpoint(chat)
        result = await optimize(
            prompt(),
            DATA,
            metric=Contains(),
            model=ep,
            optimizer_model=ep,
            optimizer_model_name=MODEL,
            batch_size=4,
            max_proposals_per_step=2,
        )
    report = result.report
    assert report.task_description and report.metric_description
    assert len(report.steps) == 1 and report.stopped_reason
    assert result.prompt.placeholders == {"country"}
    # conservative scores are never NaN: an errored example counts as a failure
    assert not math.isnan(report.initial_score) and result.score >= report.initial_score
    for proposal in report.proposals:
        assert proposal.reason
        if proposal.reason.startswith("invalid"):
            assert proposal.raw is not None or "apply call failed" in proposal.reason
    if report.proposals:
        assert chat.format_mode in {"json_object", "text"}  # json_schema got HTTP 500
