"""`GeminiChat` against the simulated Gemini dialect over real loopback HTTP.

The conformance set the OpenAI adapter has (status table, faults, redaction of the key
by value, cache identity) plus the issue's Gemini signals: a RetryInfo delay closes the
endpoint's gate once for every worker, a per-day quota stops the run.
"""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import pytest

from adapters._gemini_wire import encode_request, translate_status
from adapters.gemini import GeminiChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import (
    AuthenticationError,
    BadRequestError,
    Endpoint,
    Limits,
    NoContentError,
    QuotaExceededError,
    RateLimitedError,
    RetryPolicy,
    TransientError,
    evaluate,
)
from engine.metrics import ExactMatch

from .conftest import echo_examples, qa_prompt

FAST = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.2, timeout=1.0)
KEY = "AIzaSy-canary-0123456789abcdefghij"
RPC = "type.googleapis.com/google.rpc."


def _body(code: int, status: str, *details: dict[str, Any], message: str = "m") -> bytes:
    error = {"code": code, "status": status, "message": message, "details": list(details)}
    return json.dumps({"error": error}).encode()


def _quota(quota_id: str) -> dict[str, Any]:
    return {"@type": f"{RPC}QuotaFailure", "violations": [{"quotaId": quota_id}]}


# -- the wire, without a server -----------------------------------------------------------
def test_status_table() -> None:
    retry = {"@type": f"{RPC}RetryInfo", "retryDelay": "12s"}
    minute = _quota("GenerateRequestsPerMinutePerProjectPerModel")
    day = _quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier")
    bad_key = {"@type": f"{RPC}ErrorInfo", "reason": "API_KEY_INVALID"}
    cases: list[tuple[int, bytes, type[Exception]]] = [
        (429, _body(429, "RESOURCE_EXHAUSTED", minute, retry), RateLimitedError),
        (429, _body(429, "RESOURCE_EXHAUSTED", day, retry), QuotaExceededError),
        (400, _body(400, "INVALID_ARGUMENT", bad_key), AuthenticationError),
        (403, _body(403, "PERMISSION_DENIED"), AuthenticationError),
        (503, _body(503, "UNAVAILABLE"), TransientError),
        (500, _body(500, "INTERNAL"), TransientError),
        (400, _body(400, "INVALID_ARGUMENT"), BadRequestError),
        (404, _body(404, "NOT_FOUND"), BadRequestError),
    ]
    for status, body, kind in cases:
        assert type(translate_status(status, {}, body, endpoint="e")) is kind, body
    limited = translate_status(429, {}, _body(429, "RESOURCE_EXHAUSTED", retry), endpoint="e")
    assert isinstance(limited, RateLimitedError) and limited.retry_after == 12.0
    half = {"@type": f"{RPC}RetryInfo", "retryDelay": "0.5s"}
    limited = translate_status(429, {}, _body(429, "RESOURCE_EXHAUSTED", half), endpoint="e")
    assert isinstance(limited, RateLimitedError) and limited.retry_after == 0.5
    daily = translate_status(429, {}, _body(429, "RESOURCE_EXHAUSTED", day), endpoint="e")
    assert daily.fatal and "GenerateRequestsPerDayPerProjectPerModel" in str(daily)


def test_the_request_maps_roles_system_and_generation_config() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body = encode_request(
        [
            {"role": "system", "content": "Be exact."},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"},
        ],
        {
            "model": "gemini-x",
            "temperature": 0.2,
            "max_tokens": 64,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": {**schema, "additionalProperties": False}},
            },
        },
    )
    assert body["systemInstruction"] == {"parts": [{"text": "Be exact."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["generationConfig"] == {
        "temperature": 0.2,
        "maxOutputTokens": 64,
        "responseMimeType": "application/json",
        "responseSchema": schema,
    }
    assert "model" not in body and "response_format" not in body


def test_an_error_echoing_the_key_is_scrubbed_by_value() -> None:
    key = "plain-words-no-known-shape-43"
    chat = GeminiChat(base_url="http://127.0.0.1:9", api_key=key)
    body = _body(400, "INVALID_ARGUMENT", message=f"bad key {key}")
    error = translate_status(400, {}, body, endpoint=chat.name, secrets=chat._secrets)
    assert key not in str(error) and "[REDACTED]" in str(error)


def test_cache_identity_names_the_dialect_and_root_never_the_key() -> None:
    one = GeminiChat(base_url="HTTPS://Gateway.Example:443/", api_key=KEY)
    two = GeminiChat(base_url="http://127.0.0.1:8000", api_key=KEY, model="gemini-other")
    assert one.cache_identity == "gemini:https://gateway.example"
    assert two.cache_identity == "gemini:http://127.0.0.1:8000"
    for chat in (one, two):
        assert KEY not in chat.cache_identity + repr(chat) + chat.name


# -- over HTTP ----------------------------------------------------------------------------
async def test_a_call_reaches_the_models_route_with_the_key_header() -> None:
    async with SimulatedServer(ServerConfig(api_key=KEY)) as server:
        async with GeminiChat(base_url=server.root_url, api_key=KEY, model="gemini-t") as chat:
            result = await evaluate(qa_prompt(), echo_examples(3), model=chat, metric=ExactMatch())
    assert result.completed == 3 and result.score == 1.0
    # the prompt names its model ("demo"): the URL follows it
    assert server.stats.routes == {"/v1beta/models/demo:generateContent": 3}
    sent = server.stats.last_request
    assert sent is not None and sent["headers"]["x-goog-api-key"] == "<secret>"


@pytest.mark.parametrize(
    "fault",
    [
        {"error_rate": 0.2},
        {"overloaded_rate": 0.2},
        {"hang_rate": 0.1, "hang_seconds": 30},
        {"drop_rate": 0.2},
        {"malformed_rate": 0.2},
    ],
    ids=["500", "503", "hang", "drop", "malformed"],
)
async def test_each_fault_kind_is_retried_to_the_fault_free_result(
    fault: dict[str, float],
) -> None:
    data = echo_examples(60)
    async with SimulatedServer(ServerConfig(latency_median=0.01, seed=3, **fault)) as server:  # type: ignore[arg-type]
        async with GeminiChat(base_url=server.root_url, limits=Limits(concurrency=16)) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            faulty = await evaluate(qa_prompt(), data, model=endpoint, metric=ExactMatch())
    stats = server.stats
    injected = stats.server_errors + stats.overloaded + stats.hangs + stats.drops + stats.malformed
    assert injected > 0 and faulty.retries >= injected
    assert faulty.errors == 0 and faulty.score == 1.0 and faulty.completed == 60


async def test_a_wrong_key_fails_fast_and_is_never_quoted() -> None:
    async with SimulatedServer(ServerConfig(api_key="AIzaSy-the-right-key-0000")) as server:
        async with GeminiChat(base_url=server.root_url, api_key=KEY) as chat:
            started = time.monotonic()
            with pytest.raises(AuthenticationError) as info:
                await evaluate(qa_prompt(), echo_examples(200), model=chat, metric=ExactMatch())
            assert time.monotonic() - started < 5
    assert KEY not in str(info.value) and "canary" not in str(info.value)
    assert server.stats.received <= 32


async def test_the_daily_quota_stops_the_run_at_once_naming_the_quota() -> None:
    async with SimulatedServer(ServerConfig(daily_quota=True)) as server:
        async with GeminiChat(base_url=server.root_url) as chat:
            started = time.monotonic()
            with pytest.raises(QuotaExceededError) as info:
                await evaluate(
                    qa_prompt(),
                    echo_examples(500),
                    model=Endpoint(chat, retry=FAST),
                    metric=ExactMatch(),
                )
            assert time.monotonic() - started < 5
    assert "PerDay" in str(info.value) and "daily quota" in str(info.value)
    assert server.stats.received <= 32


async def test_a_safety_block_is_a_no_content_outcome() -> None:
    async with SimulatedServer(ServerConfig(null_content_rate=1.0)) as server:
        async with GeminiChat(base_url=server.root_url) as chat:
            with pytest.raises(NoContentError) as info:
                await chat.complete([{"role": "user", "content": "hi"}])
            result = await evaluate(
                qa_prompt(), echo_examples(4), model=Endpoint(chat, retry=FAST), metric=ExactMatch()
            )
    assert info.value.finish_reason == "SAFETY" and "SAFETY" in str(info.value)
    assert result.errors == 4 and result.scored == 0 and server.stats.paid == 5
    assert {o.error.type for o in result.outcomes if o.error} == {"NoContentError"}


async def test_a_retry_delay_of_3s_pauses_every_worker_once() -> None:
    """After 20 answers the server refuses for 3 s, each 429 carrying the time left as
    RetryInfo.  The wave of 429s in flight closes the gate once (one pause, however
    many workers saw a 429); nothing arrives while it is closed; nothing is lost."""
    config = ServerConfig(throttle_after=20, throttle_seconds=3.0, latency_median=0.02)
    async with SimulatedServer(config) as server:
        async with GeminiChat(base_url=server.root_url, limits=Limits(concurrency=8)) as chat:
            endpoint = Endpoint(chat, retry=RetryPolicy(base_delay=0.01, max_delay=0.2))
            result = await evaluate(
                qa_prompt(), echo_examples(60), model=endpoint, metric=ExactMatch()
            )
    stats = server.stats
    assert result.completed == 60 and result.errors == 0 and result.score == 1.0
    assert 1 <= stats.rate_limited <= 8  # one wave of the workers in flight, no more
    assert endpoint.statistics().limiter.pauses == 1
    arrivals = sorted(stats.arrivals)
    gap = max(b - a for a, b in itertools.pairwise(arrivals))
    assert gap >= 2.5  # the gate held every worker back for (nearly) the whole delay
