"""`LiteLLMChat` driving the simulated OpenAI dialect through LiteLLM over real HTTP.

Skipped where litellm is not installed (it is an extra, not in dev: its dependencies
are heavy).  LiteLLM's retries are off: the server must see exactly the attempts the
engine counted, and a provider error must reach the outcome as the engine's class.
"""

from __future__ import annotations

import time

import pytest

from adapters.litellm_chat import LiteLLMChat, load_litellm
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import (
    AuthenticationError,
    ConfigError,
    Endpoint,
    Limits,
    QuotaExceededError,
    RetryPolicy,
    evaluate,
)
from engine.metrics import ExactMatch

from .conftest import echo_examples, qa_prompt

try:  # as the adapter imports it: no remote price-map fetch, no pydantic notices
    load_litellm()
except ConfigError:
    pytest.skip("litellm is not installed (the 'litellm' extra)", allow_module_level=True)

FAST = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.2, timeout=2.0)
KEY = "sk-litellm-canary-0123456789abcdef"


def _chat(server: SimulatedServer, **kwargs: object) -> LiteLLMChat:
    return LiteLLMChat(model="openai/demo", api_base=server.base_url, api_key=KEY, **kwargs)  # type: ignore[arg-type]


async def test_answers_usage_and_rate_headers_come_back() -> None:
    async with SimulatedServer(ServerConfig(rpm=3000)) as server:
        async with _chat(server) as chat:
            completion = await chat.complete([{"role": "user", "content": "hello there"}])
    assert completion.text == "hello there" and completion.usage.completion_tokens == 3
    assert completion.rate_limits is not None and completion.rate_limits.limit_requests == 3000
    assert server.stats.received == 1


async def test_server_errors_are_retried_by_the_engine_alone() -> None:
    """20% 500s: every example scored, and the server saw exactly the engine's attempts
    (LiteLLM retried nothing on its own)."""
    config = ServerConfig(error_rate=0.2, latency_median=0.01, seed=3)
    async with SimulatedServer(config) as server:
        async with _chat(server, limits=Limits(concurrency=8)) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            result = await evaluate(
                qa_prompt(), echo_examples(40), model=endpoint, metric=ExactMatch()
            )
    assert server.stats.server_errors > 0
    assert result.completed == 40 and result.errors == 0 and result.score == 1.0
    assert server.stats.received == endpoint.statistics().calls


async def test_an_exhausted_quota_is_quota_exceeded_at_once() -> None:
    async with SimulatedServer(ServerConfig(quota_exhausted=True)) as server:
        async with _chat(server) as chat:
            started = time.monotonic()
            with pytest.raises(QuotaExceededError) as info:
                await evaluate(
                    qa_prompt(),
                    echo_examples(100),
                    model=Endpoint(chat, retry=FAST),
                    metric=ExactMatch(),
                )
            assert time.monotonic() - started < 10
    assert "quota" in str(info.value) and server.stats.received <= 32


async def test_a_rejected_key_is_an_authentication_error_without_the_key() -> None:
    async with SimulatedServer(ServerConfig(api_key="sk-the-right-key-000000")) as server:
        async with _chat(server) as chat:
            with pytest.raises(AuthenticationError) as info:
                await evaluate(qa_prompt(), echo_examples(20), model=chat, metric=ExactMatch())
    assert KEY not in str(info.value) and "canary" not in str(info.value)


def test_cache_identity_names_model_and_base_never_the_key() -> None:
    chat = LiteLLMChat(model="openai/demo", api_base="http://h:1/v1/?k=secret", api_key=KEY)
    assert chat.cache_identity == "litellm:openai/demo@http://h:1/v1"
    assert KEY not in chat.cache_identity + repr(chat)


@pytest.mark.slow
async def test_a_configured_rpm_holds_with_no_429_beyond_the_engines() -> None:
    """RPM 1200 on both sides, 200 examples: nothing lost, under 2% 429s at the server
    (the rate-bound fraction is in benchmarks/providers.py)."""
    async with SimulatedServer(ServerConfig(rpm=1200, latency_median=0.02)) as server:
        async with _chat(server, limits=Limits(rpm=1200, concurrency=32)) as chat:
            result = await evaluate(
                qa_prompt(), echo_examples(200), model=chat, metric=ExactMatch()
            )
    assert result.completed == 200 and result.errors == 0 and result.score == 1.0
    assert server.stats.rate_limited <= 0.02 * server.stats.received


# LiteLLM's own leak on this path (it makes the SDK call's coroutine, then fails on the
# missing key before awaiting it): not ours, and only here.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object OpenAIChatCompletion.acompletion"
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_missing_credentials_are_fatal_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """LiteLLM reports a missing key as a 500 (InternalServerError): it must stop the run
    as bad credentials do, not be retried for every example."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    async with SimulatedServer(ServerConfig()) as server:
        chat = LiteLLMChat(model="openai/demo", api_base=server.base_url)
        with pytest.raises(AuthenticationError) as info:
            await evaluate(
                qa_prompt(),
                echo_examples(50),
                model=Endpoint(chat, retry=FAST),
                metric=ExactMatch(),
            )
    assert "credentials" in str(info.value) and server.stats.received == 0
    assert info.value.attempts == 1
