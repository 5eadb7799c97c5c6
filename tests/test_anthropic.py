"""`AnthropicChat` against the simulated Anthropic dialect over real loopback HTTP.

The conformance set the OpenAI adapter has (status table, faults, redaction of the key
by value, cache identity) plus the issue's limits: ITPM and OTPM learned and held, a
529 storm that loses nothing and lowers nothing, the spend limit stopping the run.
Assertions are on the server's counts where the server can tell.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from adapters._anthropic_wire import parse_rate_limits, parse_reset, translate_status
from adapters._fake import REFUSAL_TEXT
from adapters.anthropic import AnthropicChat
from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import (
    AuthenticationError,
    BadRequestError,
    Endpoint,
    Limits,
    NoContentError,
    PermanentError,
    Price,
    QuotaExceededError,
    RateLimitedError,
    RetryPolicy,
    TransientError,
    Usage,
    evaluate,
)
from engine.endpoint._limits import RateLimiter
from engine.metrics import ExactMatch

from .conftest import echo_examples, qa_prompt

FAST = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.2, timeout=1.0)
KEY = "sk-ant-api03-canary-0123456789abcdef"


def _body(kind: str, message: str = "m", **details: str) -> bytes:
    import json

    error: dict[str, Any] = {"type": kind, "message": message}
    if details:
        error["details"] = details
    return json.dumps({"type": "error", "error": error}).encode()


# -- the wire, without a server -----------------------------------------------------------
def test_status_table() -> None:
    cases: list[tuple[int, bytes, dict[str, str], type[Exception]]] = [
        (429, _body("rate_limit_error"), {"retry-after": "7"}, RateLimitedError),
        (
            429,
            _body("rate_limit_error", error_code="enforced_spend_limit_reached"),
            {},
            QuotaExceededError,
        ),
        (402, _body("billing_error"), {}, QuotaExceededError),
        (529, _body("overloaded_error"), {}, TransientError),
        (500, _body("api_error"), {}, TransientError),
        (401, _body("authentication_error"), {}, AuthenticationError),
        (403, _body("permission_error"), {}, AuthenticationError),
        (400, _body("invalid_request_error"), {}, BadRequestError),
        (404, _body("not_found_error"), {}, BadRequestError),
        (413, _body("request_too_large"), {}, BadRequestError),
        (302, b"", {}, PermanentError),
    ]
    for status, body, headers, kind in cases:
        error = translate_status(status, headers, body, endpoint="e")
        assert type(error) is kind, (status, body)
    limited = translate_status(429, {"retry-after": "7"}, _body("rate_limit_error"), endpoint="e")
    assert isinstance(limited, RateLimitedError) and limited.retry_after == 7.0
    overloaded = translate_status(529, {}, _body("overloaded_error"), endpoint="e")
    assert not isinstance(overloaded, RateLimitedError) and overloaded.retryable
    spend = translate_status(
        429, {}, _body("rate_limit_error", error_code="enforced_spend_limit_reached"), endpoint="e"
    )
    assert spend.fatal and not spend.retryable and "enforced_spend_limit_reached" in str(spend)


def test_an_error_echoing_the_key_is_scrubbed_by_value() -> None:
    key = "plain-words-no-known-shape-42"  # no sk-... shape for a pattern to catch
    chat = AnthropicChat(base_url="http://127.0.0.1:9/", api_key=key)
    error = translate_status(
        400,
        {},
        _body("invalid_request_error", f"bad key {key}"),
        endpoint=chat.name,
        secrets=chat._secrets,
    )
    assert key not in str(error) and "[REDACTED]" in str(error)


def test_rate_limit_headers_with_rfc3339_resets() -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 30))
    snap = parse_rate_limits(
        {
            "anthropic-ratelimit-requests-limit": "3000",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": stamp,
            "anthropic-ratelimit-input-tokens-limit": "80000",
            "anthropic-ratelimit-output-tokens-limit": "16000",
        }
    )
    assert snap is not None and snap.limit_requests == 3000 and snap.remaining_requests == 0
    assert snap.limit_input_tokens == 80000 and snap.limit_output_tokens == 16000
    assert snap.reset_requests is not None and 28 <= snap.reset_requests <= 31
    assert parse_reset("not a time") is None and parse_reset("2020-01-01T00:00:00Z") == 0.0
    assert parse_rate_limits({"x-ratelimit-limit-requests": "5"}) is None


def test_cache_tokens_are_priced_as_anthropic_prices_them() -> None:
    price = Price(3.0, 15.0)  # per 1M: writes 3.75, reads 0.30
    usage = Usage(1_000_000, 0, cache_creation_input_tokens=1_000_000)
    assert price.cost(usage) == pytest.approx(3.0 + 3.75)
    assert price.cost(Usage(0, 0, 0, 1_000_000)) == pytest.approx(0.30)
    assert (Usage(1, 2, 3, 4) + Usage(1, 1, 1, 1)).total_tokens == 14


def test_cache_identity_names_the_dialect_and_root_never_the_key() -> None:
    one = AnthropicChat(base_url="HTTPS://Proxy.Example:443/", api_key=KEY)
    two = AnthropicChat(base_url="http://127.0.0.1:8000", api_key=KEY)
    openai = OpenAIChat(base_url="http://127.0.0.1:8000", api_key=KEY)
    assert one.cache_identity == "anthropic-messages:https://proxy.example"
    assert two.cache_identity == "anthropic-messages:http://127.0.0.1:8000"
    assert two.cache_identity != openai.cache_identity
    for chat in (one, two):
        assert KEY not in chat.cache_identity + repr(chat) + chat.name


# -- over HTTP ----------------------------------------------------------------------------
async def test_the_request_is_a_messages_call_with_system_on_top_and_max_tokens() -> None:
    seen: list[dict[str, Any]] = []

    def answer(messages: Any, body: dict[str, Any]) -> str:
        seen.append(body)
        return str(messages[-1]["content"])

    async with SimulatedServer(ServerConfig(api_key=KEY, answer=answer)) as server:  # type: ignore[arg-type]
        async with AnthropicChat(base_url=server.root_url, api_key=KEY) as chat:
            result = await evaluate(qa_prompt(), echo_examples(3), model=chat, metric=ExactMatch())
    assert result.completed == 3 and result.score == 1.0
    assert server.stats.routes == {"/v1/messages": 3}
    sent = server.stats.last_request
    assert sent is not None and sent["headers"]["x-api-key"] == "<secret>"
    assert sent["headers"]["anthropic-version"] == "2023-06-01"
    assert seen[0]["system"] == "Answer the question." and seen[0]["max_tokens"] == 1024
    assert all(m["role"] != "system" for m in seen[0]["messages"][1:])


@pytest.mark.parametrize(
    "fault",
    [
        {"error_rate": 0.2},
        {"overloaded_rate": 0.2},
        {"hang_rate": 0.1, "hang_seconds": 30},
        {"drop_rate": 0.2},
        {"malformed_rate": 0.2},
    ],
    ids=["500", "529", "hang", "drop", "malformed"],
)
async def test_each_fault_kind_is_retried_to_the_fault_free_result(
    fault: dict[str, float],
) -> None:
    data = echo_examples(60)
    async with SimulatedServer(ServerConfig(latency_median=0.01, seed=3, **fault)) as server:  # type: ignore[arg-type]
        async with AnthropicChat(base_url=server.root_url, limits=Limits(concurrency=16)) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            faulty = await evaluate(qa_prompt(), data, model=endpoint, metric=ExactMatch())
    stats = server.stats
    injected = stats.server_errors + stats.overloaded + stats.hangs + stats.drops + stats.malformed
    assert injected > 0 and faulty.retries >= injected
    assert faulty.errors == 0 and faulty.score == 1.0 and faulty.completed == 60


async def test_a_529_storm_loses_nothing_and_lowers_no_learned_limit() -> None:
    """20% of requests overloaded: every example scored, no pause, no 429 counted, and
    the limits learned from the headers are the announced ones afterwards."""
    config = ServerConfig(
        rpm=3000, input_tpm=400_000, output_tpm=100_000, overloaded_rate=0.2, seed=5
    )
    async with SimulatedServer(config) as server:
        async with AnthropicChat(base_url=server.root_url, limits=Limits(concurrency=16)) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            result = await evaluate(
                qa_prompt(), echo_examples(300), model=endpoint, metric=ExactMatch()
            )
    assert server.stats.overloaded >= 30
    assert result.completed == 300 and result.errors == 0 and result.score == 1.0
    stats = endpoint.statistics()
    assert stats.rate_limited == 0 and stats.limiter.pauses == 0
    limiter = stats.limiter
    assert limiter.rpm == 3000 * 0.95
    assert limiter.input_tpm == 400_000 * 0.95 and limiter.output_tpm == 100_000 * 0.95


async def test_401_fails_fast_naming_the_endpoint_and_not_the_key() -> None:
    async with SimulatedServer(ServerConfig(api_key="sk-ant-the-right-key-000")) as server:
        async with AnthropicChat(base_url=server.root_url, api_key=KEY) as chat:
            started = time.monotonic()
            with pytest.raises(AuthenticationError) as info:
                await evaluate(qa_prompt(), echo_examples(200), model=chat, metric=ExactMatch())
            assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message and "credentials" in message
    assert KEY not in message and "canary" not in message
    assert server.stats.received <= 32


async def test_the_spend_limit_stops_the_run_at_once_naming_the_cause() -> None:
    async with SimulatedServer(ServerConfig(spend_limit=True)) as server:
        async with AnthropicChat(base_url=server.root_url) as chat:
            started = time.monotonic()
            with pytest.raises(QuotaExceededError) as info:
                await evaluate(
                    qa_prompt(),
                    echo_examples(500),
                    model=Endpoint(chat, retry=FAST),
                    metric=ExactMatch(),
                )
            assert time.monotonic() - started < 5
    assert "enforced_spend_limit_reached" in str(info.value)
    assert server.stats.received <= 32  # the first wave only: never retried


async def test_a_refusal_is_a_no_content_outcome_with_its_text() -> None:
    config = ServerConfig(null_content_rate=1.0, seed=1)
    async with SimulatedServer(config) as server:
        async with AnthropicChat(base_url=server.root_url) as chat:
            with pytest.raises(NoContentError) as info:
                await chat.complete([{"role": "user", "content": "hi"}], model="m")
            result = await evaluate(
                qa_prompt(), echo_examples(4), model=Endpoint(chat, retry=FAST), metric=ExactMatch()
            )
    error = info.value
    assert error.finish_reason == "refusal" and error.refusal == REFUSAL_TEXT
    assert REFUSAL_TEXT in str(error)
    # every example ends with the error as its outcome: not retried, never scored
    assert result.errors == 4 and result.scored == 0 and server.stats.paid == 5
    assert {o.error.type for o in result.outcomes if o.error} == {"NoContentError"}


async def test_a_429_with_retry_after_closes_the_gate_and_loses_nothing() -> None:
    config = ServerConfig(throttle_after=10, throttle_seconds=1.0, latency_median=0.01)
    async with SimulatedServer(config) as server:
        async with AnthropicChat(base_url=server.root_url, limits=Limits(concurrency=8)) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            result = await evaluate(
                qa_prompt(), echo_examples(40), model=endpoint, metric=ExactMatch()
            )
    assert server.stats.rate_limited >= 1 and result.completed == 40 and result.errors == 0
    assert endpoint.statistics().limiter.pauses >= 1


@pytest.mark.looptime
async def test_input_and_output_buckets_settle_with_the_reported_usage() -> None:
    """OTPM 600/min (a 10-token bucket): max_tokens=10 reserves the whole bucket, and
    an answer of 2 tokens gives 8 back at once, so the next call needs no wait; the
    input bucket is charged the 4 tokens its estimate missed."""
    import asyncio

    loop = asyncio.get_running_loop()
    limiter = RateLimiter(Limits(output_tpm=600, input_tpm=600))
    await limiter.acquire(input_tokens=5, output_tokens=10)
    limiter.release()
    await limiter.reconcile_split(
        input_estimate=5, input_actual=9, output_estimate=10, output_actual=2
    )
    started = loop.time()
    await limiter.acquire(input_tokens=1, output_tokens=8)
    limiter.release()
    assert loop.time() - started < 0.01  # without the give-back: 0.8 s to drain
    await limiter.acquire(input_tokens=10, output_tokens=0)
    limiter.release()
    assert loop.time() - started >= 0.99  # the input bucket was full: 10 tokens = 1 s
    stats = limiter.statistics()
    assert stats.input_tpm == 600 and stats.output_tpm == 600


# -- the throughput runs (numbers in benchmarks/providers.py, not here) ----------
PADDING = "Answer with the item named below, exactly as written, and nothing else. " * 3
BOUND_CONFIG = {"rpm": 3000, "input_tpm": 150_000, "output_tpm": 32_000}


def _long_examples(n: int) -> list[Any]:
    from engine import Example

    return [
        Example(
            {"question": f"item {i} of the long list of items"},
            f"item {i} of the long list of items",
            id=f"l{i}",
        )
        for i in range(n)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("configured", [True, False], ids=["configured", "headers-only"])
async def test_1000_examples_under_a_binding_itpm_otpm_pair_lose_nothing(
    configured: bool,
) -> None:
    """RPM 3000 with ITPM/OTPM binding at about 40 requests/s: every example scored
    as a clean run scores it; 429s under 2% with the limits configured, under 10%
    learned from the headers alone."""
    server_config = ServerConfig(latency_median=0.05, latency_sigma=0.5, **BOUND_CONFIG)  # type: ignore[arg-type]
    limits = Limits(concurrency=64, **BOUND_CONFIG) if configured else Limits(concurrency=64)  # type: ignore[arg-type]
    async with SimulatedServer(server_config) as server:
        async with AnthropicChat(base_url=server.root_url, limits=limits) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            result = await evaluate(
                qa_prompt(PADDING, params={"max_tokens": 32}),
                _long_examples(1000),
                model=endpoint,
                metric=ExactMatch(),
            )
    stats = server.stats
    assert result.completed == 1000 and result.errors == 0 and result.score == 1.0
    assert stats.rate_limited <= (0.02 if configured else 0.10) * stats.received


# -- the Message Batches API --------------------------------------------------------------
async def _batch_run(config: ServerConfig, tmp_path: Any, n: int = 40, **options: Any) -> tuple:
    from adapters.anthropic_batch import AnthropicBatch
    from engine import Cache

    data = echo_examples(n)
    async with SimulatedServer(config) as server:
        async with (
            AnthropicBatch(base_url=server.root_url, poll_interval=0.05, **options) as batch,
            Cache.sqlite(str(tmp_path / "c.sqlite")) as cache,
            AnthropicChat(base_url=server.root_url, limits=Limits(concurrency=8)) as chat,
        ):
            endpoint = Endpoint(chat, retry=FAST)
            report = await batch.prefill(qa_prompt(), data, cache=cache, model=endpoint)
            result = await evaluate(
                qa_prompt(), data, model=endpoint, metric=ExactMatch(), cache=cache
            )
            again = await batch.prefill(qa_prompt(), data, cache=cache, model=endpoint)
    return report, result, again, server


async def test_batch_fills_the_cache_and_failed_items_go_through_the_normal_path(
    tmp_path: Any,
) -> None:
    config = ServerConfig(batch_delay=0.2, batch_failure_rate=0.2, null_content_rate=0.1, seed=4)
    report, result, again, server = await _batch_run(config, tmp_path)
    stats = server.anthropic_batches.stats
    assert report.submitted == 40 and stats.polls >= 2  # it really waited for the batch
    assert report.failed == stats.errored + stats.null_contents > 0
    assert report.filled == 40 - report.failed
    reasons = set(report.failures.values())
    assert any(r.startswith("errored") for r in reasons) and any("refused" in r for r in reasons)
    # exactly the failed items were paid through the chat path, then everything scored
    # (a refused item is refused again there: its outcome says so, never a prediction)
    assert server.stats.paid == report.failed == result.calls
    assert result.completed == 40 and result.cache_hits == report.filled
    assert result.errors == server.stats.null_contents
    assert again.submitted == result.errors and again.already_cached == 40 - result.errors


async def test_expired_batch_items_are_reported_and_completed_normally(tmp_path: Any) -> None:
    report, result, _, server = await _batch_run(
        ServerConfig(batch_delay=0.05, batch_expire=True), tmp_path, max_requests_per_batch=15
    )
    assert len(report.batches) == 3 and set(report.statuses.values()) == {"ended"}
    assert report.expired == server.anthropic_batches.stats.expired > 0
    assert set(report.failures.values()) == {"expired"}
    assert server.stats.paid == report.expired and result.score == 1.0
    assert result.completed == 40 and result.errors == 0


def test_cli_evaluate_with_an_anthropic_batch_section(tmp_path: Any) -> None:
    """The CLI's [batch] section takes AnthropicBatch as it takes OpenAIBatch."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    config = ServerConfig(batch_delay=0.1, batch_failure_rate=0.1, seed=2)
    with SimulatedServer(config) as server:
        rows = [
            json.dumps({"id": f"b{i}", "question": f"q{i}", "expected": f"q{i}"}) for i in range(30)
        ]
        (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
        (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "sim"
[data]
train = "data.jsonl"
[model]
adapter = "adapters.anthropic:AnthropicChat"
options = {{ base_url = "{server.root_url}" }}
[batch]
adapter = "adapters.anthropic_batch:AnthropicBatch"
options = {{ base_url = "{server.root_url}", poll_interval = 0.05 }}
[cache]
path = "cache.sqlite"
[output]
dir = "out"
""")
        done = subprocess.run(
            [sys.executable, "-m", "engine", "evaluate", str(tmp_path / "run.toml"), "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[1],
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["completed"] == 30 and summary["score"] == 1.0
    errored = server.anthropic_batches.stats.errored
    assert server.stats.paid == errored == summary["calls"]
    assert f"batch: {30 - errored} of 30 filled" in done.stderr


def test_native_adapters_import_no_sdk_and_pickle_as_their_arguments() -> None:
    """Anthropic, Gemini and the batch adapter run on aiohttp: importing them (and the
    LiteLLM adapter's class) imports no provider SDK; a cluster worker gets a copy
    built from the constructor arguments, with the same cache identity."""
    import pickle
    import subprocess
    import sys

    code = (
        "import sys; from adapters import AnthropicChat, AnthropicBatch, GeminiChat, LiteLLMChat; "
        "print(sorted(m for m in ('openai', 'litellm', 'anthropic', 'google.genai', 'httpx2') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    from adapters.gemini import GeminiChat

    for chat in (
        AnthropicChat(base_url="http://127.0.0.1:9", api_key=KEY, default_max_tokens=64),
        GeminiChat(base_url="http://127.0.0.1:9", api_key=KEY, model="gemini-x"),
    ):
        copy = pickle.loads(pickle.dumps(chat))
        assert type(copy) is type(chat) and copy.cache_identity == chat.cache_identity
    assert pickle.loads(pickle.dumps(chat)).model == "gemini-x"
