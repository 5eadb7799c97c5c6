"""Both transports of `OpenAIChat` over real loopback HTTP: what each failure becomes.

Every test runs on the lean aiohttp transport and on the SDK transport, against the
simulated provider (or a socket that refuses, or never accepts), and asserts on the
engine error raised and on what the server really received.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from adapters._fake import REFUSAL_TEXT
from adapters.openai_batch import OpenAIBatch
from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer, wait_until_listening
from engine import (
    BadRequestError,
    Cache,
    CallTimeoutError,
    ConfigError,
    ConnectionFailedError,
    Endpoint,
    Limits,
    NoContentError,
    PermanentError,
    QuotaExceededError,
    RateLimitedError,
    RetryPolicy,
    TransientError,
    evaluate,
)
from engine.metrics import ExactMatch

from .conftest import echo_examples, echo_model, qa_prompt

TRANSPORTS = ["aiohttp", "sdk"]
FAST = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.2, timeout=2.0)
HELLO = [{"role": "user", "content": "hello"}]
SCHEMA = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object"}},
}


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port that is bound but not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@contextlib.contextmanager
def unanswering_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new connect never completes."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        for _ in range(4):  # fill the queue; later SYNs are dropped by the kernel
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        time.sleep(0.1)
        yield port


# -- fail fast: quota, nothing listening --------------------------------------------------
async def test_exhausted_quota_fails_the_run_at_once_and_is_not_retried(transport: str) -> None:
    """429 insufficient_quota is billing, not a rate limit: fatal, no retry, no pause."""
    async with SimulatedServer(ServerConfig(quota_exhausted=True)) as server:
        chat = OpenAIChat(
            base_url=server.base_url, limits=Limits(concurrency=8), transport=transport
        )
        async with chat:
            started = time.monotonic()
            with pytest.raises(QuotaExceededError) as info:
                await evaluate(qa_prompt(), echo_examples(100), model=chat, metric=ExactMatch())
            elapsed = time.monotonic() - started
    assert elapsed < 5 and info.value.fatal and info.value.status == 429
    assert "insufficient_quota" in str(info.value) and "billing" in str(info.value)
    assert server.stats.quota_refusals == server.stats.received <= 8  # the first wave only


async def test_an_ordinary_429_stays_a_rate_limit_with_its_retry_after(transport: str) -> None:
    config = ServerConfig(rpm=60, retry_after="ms")  # one request a second, then 429s
    async with SimulatedServer(config) as server:
        async with OpenAIChat(base_url=server.base_url, transport=transport) as chat:
            first = await chat.complete(HELLO, model="m")
            with pytest.raises(RateLimitedError) as info:
                await chat.complete(HELLO, model="m")
    assert first.rate_limits is not None and first.rate_limits.limit_requests == 60
    assert first.rate_limits.reset_requests is not None
    assert not isinstance(info.value, QuotaExceededError)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 1.0


async def test_connection_refused_names_the_url_and_feeds_the_breaker(transport: str) -> None:
    with refusing_port() as port:
        url = f"http://127.0.0.1:{port}/v1"
        async with OpenAIChat(base_url=url, transport=transport) as chat:
            with pytest.raises(ConnectionFailedError) as info:
                await chat.complete(HELLO, model="m")
    assert f"cannot reach {url}: connection refused" in str(info.value)
    assert isinstance(info.value, TransientError) and info.value.retryable


async def test_a_connect_that_never_completes_is_a_connect_timeout(transport: str) -> None:
    with unanswering_port() as port:
        url = f"http://127.0.0.1:{port}/v1"
        async with OpenAIChat(base_url=url, timeout=1.0, transport=transport) as chat:
            with pytest.raises(ConnectionFailedError, match="connect timeout"):
                await chat.complete(HELLO, model="m")


async def test_a_connection_dropped_mid_response_is_a_plain_transient_error(
    transport: str,
) -> None:
    async with SimulatedServer(ServerConfig(drop_rate=1.0)) as server:
        async with OpenAIChat(base_url=server.base_url, transport=transport) as chat:
            with pytest.raises(TransientError) as info:
                await chat.complete(HELLO, model="m")
    assert not isinstance(info.value, ConnectionFailedError | CallTimeoutError)
    assert server.stats.drops == 1


async def test_a_slow_answer_is_a_call_timeout(transport: str) -> None:
    async with SimulatedServer(ServerConfig(latency_median=5.0)) as server:
        async with OpenAIChat(base_url=server.base_url, timeout=1.0, transport=transport) as chat:
            with pytest.raises(CallTimeoutError):
                await chat.complete(HELLO, model="m")


# -- answers without text -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["refusal", "tool_calls", "content_filter"])
async def test_an_answer_without_text_is_an_error_never_an_empty_prediction(
    transport: str, kind: str
) -> None:
    config = ServerConfig(null_content_rate=1.0, null_content_kind=kind)
    async with SimulatedServer(config) as server:
        async with OpenAIChat(base_url=server.base_url, transport=transport) as chat:
            with pytest.raises(NoContentError) as info:
                await chat.complete(HELLO, model="m")
            result = await evaluate(
                qa_prompt(), echo_examples(6), model=Endpoint(chat, retry=FAST), metric=ExactMatch()
            )
    error = info.value
    assert error.finish_reason == {"refusal": "stop"}.get(kind, kind)
    assert f"finish_reason {error.finish_reason}" in str(error)
    if kind == "refusal":
        assert error.refusal == REFUSAL_TEXT and f"refusal: {REFUSAL_TEXT!r}" in str(error)
    else:
        assert error.refusal is None
    # every example ends with the error as its outcome: not retried, never scored
    assert result.errors == 6 and result.scored == 0 and server.stats.paid == 7
    assert {o.error.type for o in result.outcomes if o.error} == {"NoContentError"}
    assert all(o.prediction is None for o in result.outcomes)


async def test_batch_items_without_text_are_failures_not_predictions(tmp_path: Path) -> None:
    config = ServerConfig(batch_delay=0.0, null_content_rate=0.3, seed=5)
    data = echo_examples(40)
    async with SimulatedServer(config) as server:
        async with (
            OpenAIBatch(base_url=server.base_url, poll_interval=0.05) as batch,
            Cache.sqlite(str(tmp_path / "c.sqlite")) as cache,
        ):
            chat = OpenAIChat(base_url=server.base_url)
            report = await batch.prefill(qa_prompt(), data, cache=cache, model=chat)
            request = Endpoint.of(chat).request_key(qa_prompt())
            cached = [await cache.has_prediction(request, e) for e in data]
            await chat.aclose()
    refused = server.batches.stats.null_contents
    assert 0 < refused < 40 and report.failed == refused and report.filled == 40 - refused
    assert sum(cached) == report.filled
    for example, hit in zip(data, cached, strict=True):
        assert hit == (example.id not in report.failures)
    assert all("refusal" in reason for reason in report.failures.values())


# -- statuses, redirects, format ladder ---------------------------------------------------
async def test_a_wrong_path_is_a_bad_request_with_the_servers_words(transport: str) -> None:
    async with SimulatedServer() as server:
        url = server.base_url.replace("/v1", "/nowhere")
        async with OpenAIChat(base_url=url, transport=transport) as chat:
            with pytest.raises(BadRequestError) as info:
                await Endpoint(chat, retry=FAST).complete(HELLO, {"model": "m"})
    assert info.value.status == 404 and "Not Found" in str(info.value)
    assert info.value.attempts == 1


async def test_a_redirect_is_reported_with_its_location_not_followed(transport: str) -> None:
    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 301 Moved Permanently\r\nLocation: https://127.0.0.1:1/v1/chat/completions"
            b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(redirect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with (
        server,
        OpenAIChat(base_url=f"http://127.0.0.1:{port}/v1", transport=transport) as chat,
    ):
        with pytest.raises(PermanentError) as info:
            await chat.complete(HELLO, model="m")
    assert info.value.status == 301 and "redirected to https://127.0.0.1:1/v1" in str(info.value)


async def test_concurrent_format_rejections_step_down_one_rung_only(transport: str) -> None:
    """Twenty json_schema requests rejected at once leave the endpoint at json_object,
    not at plain text (each rejection used to step down on its own)."""
    async with SimulatedServer(ServerConfig(reject_json_schema=True)) as server:
        async with OpenAIChat(
            base_url=server.base_url, limits=Limits(concurrency=20), transport=transport
        ) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            assert chat.response_format_sent(SCHEMA) == SCHEMA

            async def one() -> None:
                await endpoint.complete(HELLO, {"model": "m", "response_format": SCHEMA})

            async with anyio.create_task_group() as tg:
                for _ in range(20):
                    tg.start_soon(one)
    assert chat.format_mode == "json_object" and server.stats.paid == 20
    assert server.stats.rejected_format == 20
    assert chat.response_format_sent(SCHEMA) == {
        "type": "json_object",
        "schema": {"type": "object"},
    }
    assert chat.response_format_sent({"type": "json_object"}) == {"type": "json_object"}
    assert chat.response_format_sent(None) is None


# -- identity, pooling, lifecycle ---------------------------------------------------------
def test_cache_identity_names_the_endpoint_and_never_a_secret() -> None:
    key = "sk-canary-identity-0123456789"
    one = OpenAIChat(base_url="HTTPS://Gateway.Example:443/v1/?token=hidden", api_key=key)
    two = OpenAIChat(base_url="http://127.0.0.1:8000/v1", api_key=key, transport="sdk")
    gateway = OpenAIChat(
        base_url="http://127.0.0.1:8000/v1", headers={"x-key": key}, query={"secret": "q"}
    )
    assert one.cache_identity == "openai-chat:https://gateway.example/v1"
    assert two.cache_identity == gateway.cache_identity == "openai-chat:http://127.0.0.1:8000/v1"
    for chat in (one, two, gateway):
        text = chat.cache_identity + repr(chat) + chat.name
        assert key not in text and "hidden" not in text and "secret" not in text
    with pytest.raises(ConfigError) as info:
        OpenAIChat(base_url="https://user:pa55word@gateway.example/v1")
    assert "pa55word" not in str(info.value)
    with pytest.raises(ConfigError, match="transport"):
        OpenAIChat(base_url="http://127.0.0.1:8000/v1", transport="carrier-pigeon")  # type: ignore[arg-type]


async def test_keep_alive_connections_are_reused_up_to_the_pool_size(transport: str) -> None:
    async with SimulatedServer() as server:
        async with OpenAIChat(
            base_url=server.base_url, limits=Limits(concurrency=8), transport=transport
        ) as chat:
            result = await evaluate(
                qa_prompt(), echo_examples(200), model=chat, metric=ExactMatch()
            )
    assert result.score == 1.0 and server.stats.paid == 200
    assert server.stats.connections <= 8 and server.stats.max_in_flight <= 8


async def test_the_request_is_compact_json_with_its_content_type(transport: str) -> None:
    seen: list[dict[str, object]] = []

    def answer(messages: object, body: dict[str, object]) -> str:
        seen.append(body)
        return "ok"

    async with SimulatedServer(ServerConfig(answer=answer)) as server:  # type: ignore[arg-type]
        async with OpenAIChat(base_url=server.base_url, transport=transport) as chat:
            completion = await chat.complete(
                HELLO, model="m", temperature=0.0, response_format=SCHEMA
            )
    assert completion.text == "ok" and completion.finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.model == "m"
    assert seen == [
        {"messages": HELLO, "model": "m", "temperature": 0.0, "response_format": SCHEMA}
    ]
    request = server.stats.last_request
    assert request is not None and request["headers"]["content-type"] == "application/json"
    assert request["headers"]["authorization"] == "<secret>"


def test_one_adapter_serves_two_event_loops_in_turn(caplog: pytest.LogCaptureFixture) -> None:
    """An adapter used under one ``anyio.run``, closed, then used under another opens a
    fresh session there, with no "Unclosed client session" errors in the host's log.

    (Used again *without* closing, the first loop's pooled sockets can only close when
    collected, with Python's ResourceWarning: nothing can run on an ended loop.)"""
    import logging

    with SimulatedServer() as server, caplog.at_level(logging.ERROR, logger="asyncio"):
        chat = OpenAIChat(base_url=server.base_url)

        async def ask_and_close() -> str:
            try:
                return (await chat.complete(HELLO, model="m")).text
            finally:
                await chat.aclose()

        assert anyio.run(ask_and_close) == anyio.run(ask_and_close) == "hello"
    assert server.stats.paid == 2
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


def test_connect_failures_say_why_in_a_few_words() -> None:
    """What each transport's connect error chain reads as (a DNS failure is built here:
    resolving a name would query the machine's resolver, off this host)."""
    import aiohttp
    import httpx2
    from aiohttp.client_reqrep import ConnectionKey

    from adapters._http import connect_failure_reason

    key = ConnectionKey("no-such-host.invalid", 443, True, True, None, None, None)
    dns = aiohttp.ClientConnectorDNSError(key, socket.gaierror(-2, "Name or service not known"))
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))

    def chained(cause: OSError) -> httpx2.ConnectError:
        try:
            try:
                raise cause
            except OSError as exc:
                raise httpx2.ConnectError(str(exc)) from exc
        except httpx2.ConnectError as error:
            return error

    assert connect_failure_reason(dns) == "unknown host"
    assert connect_failure_reason(refused) == "connection refused"
    assert connect_failure_reason(chained(socket.gaierror(-2, "no name"))) == "unknown host"
    assert (
        connect_failure_reason(chained(ConnectionRefusedError(111, "no"))) == "connection refused"
    )
    assert connect_failure_reason(chained(OSError(113, "No route to host"))) == "host unreachable"
    assert connect_failure_reason(chained(TimeoutError("timed out"))) == "connect timeout"


def test_the_server_command_line_takes_the_new_options() -> None:
    """``python -m adapters.simulated_server`` with the quota and api-key flags."""
    import subprocess
    import sys

    from engine import AuthenticationError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    key = "cli-key-3b9d2c7e"
    command = [sys.executable, "-m", "adapters.simulated_server", "--port", str(port)]
    command += ["--quota-exhausted", "--api-key", key, "--api-key-header"]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, server)

        async def ask(api_key: str) -> None:
            async with OpenAIChat(
                azure_endpoint=f"http://127.0.0.1:{port}",
                azure_deployment="d",
                api_version="2024-10-21",
                api_key=api_key,
            ) as chat:
                await chat.complete(HELLO, model="m")

        with pytest.raises(QuotaExceededError):  # the api-key header passed, then quota
            anyio.run(ask, key)
        with pytest.raises(AuthenticationError):
            anyio.run(ask, "wrong")
    finally:
        server.terminate()
        server.wait(10)


async def test_a_batch_endpoint_gone_mid_poll_is_a_connection_failure_not_a_group(
    tmp_path: Path,
) -> None:
    """A poll failing inside the batch's task group surfaces as the engine's error."""
    server = SimulatedServer(ServerConfig(batch_delay=30.0))
    await anyio.to_thread.run_sync(server.start)
    try:
        async with (
            OpenAIBatch(base_url=server.base_url, poll_interval=0.05) as batch,
            Cache.sqlite(str(tmp_path / "c.sqlite")) as cache,
        ):

            async def stop_after_the_first_poll() -> None:
                while server.batches.stats.polls == 0:
                    await anyio.sleep(0.02)
                await anyio.to_thread.run_sync(server.stop)

            async with anyio.create_task_group() as tg:
                tg.start_soon(stop_after_the_first_poll)
                with pytest.raises(ConnectionFailedError, match="connection refused"):
                    await batch.prefill(
                        qa_prompt(), echo_examples(5), cache=cache, model=echo_model()
                    )
    finally:
        await anyio.to_thread.run_sync(server.stop)


def _evaluate_in_a_new_loop(chat: OpenAIChat, n: int) -> tuple[int, int]:
    """``asyncio.run(evaluate(...))`` as a script does: completed and errors."""
    result = asyncio.run(evaluate(qa_prompt(), echo_examples(n), model=chat, metric=ExactMatch()))
    return result.completed, result.errors


def _collect_warnings() -> list[str]:
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_one_adapter_in_two_threads_refuses_the_second_loop_at_once() -> None:
    """Two threads, each with its own asyncio.run, one adapter: the second is refused
    at once with a clear message; the first completes every example.  Before, one
    hung at 199/200 or died with "Session is closed"."""
    import threading

    outcomes: dict[str, object] = {}

    def run(name: str, chat: OpenAIChat) -> None:
        try:
            outcomes[name] = _evaluate_in_a_new_loop(chat, 200)
        except Exception as exc:
            outcomes[name] = exc

    with SimulatedServer(ServerConfig(latency_median=0.02)) as server:
        chat = OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=8))
        first = threading.Thread(target=run, args=("first", chat), daemon=True)
        first.start()
        deadline = time.monotonic() + 30
        while server.stats.received == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        second = threading.Thread(target=run, args=("second", chat), daemon=True)
        second.start()
        second.join(30)
        first.join(60)
        assert not first.is_alive() and not second.is_alive()
    assert outcomes["first"] == (200, 0)
    refused = outcomes["second"]
    assert isinstance(refused, ConfigError) and "in use by another event loop" in str(refused)
    assert "create one adapter per loop" in str(refused)


def test_an_unclosed_adapter_serves_loops_in_turn_without_warnings(
    caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """The README's library usage without ``async with``: two ``asyncio.run`` in turn
    (limiter rebuilt for the second loop: no aiolimiter reuse warning), and at exit no
    "Unclosed client session" and no leaked socket: each loop closed its session as it
    shut down."""
    import logging

    with SimulatedServer() as server, caplog.at_level(logging.ERROR, logger="asyncio"):
        chat = OpenAIChat(
            base_url=server.base_url,
            limits=Limits(rpm=60_000, concurrency=8),
            transport=transport,  # type: ignore[arg-type]
        )
        assert _evaluate_in_a_new_loop(chat, 20) == (20, 0)
        assert _evaluate_in_a_new_loop(chat, 20) == (20, 0)
        del chat
        leaked = _collect_warnings()
    assert leaked == []
    assert not [r for r in caplog.records if "Unclosed" in r.getMessage()]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_answer_over_the_size_cap_fails_once_naming_the_cap(
    transport: str, chunked: bool
) -> None:
    """A 2 MiB answer against a 1 MiB cap: a PermanentError naming the cap, not retried
    (before: any size was read whole, 50 MB answers included, and parsed)."""
    body = b'{"choices": [{"message": {"content": "' + b"x" * (2 * 2**20) + b'"}}]}'
    async with SimulatedServer(ServerConfig(body=body, chunked=chunked)) as server:
        async with OpenAIChat(
            base_url=server.base_url, transport=transport, max_response_bytes=2**20
        ) as chat:
            endpoint = Endpoint(chat, retry=FAST)
            with pytest.raises(PermanentError, match=r"max_response_bytes=1048576"):
                await endpoint.complete(HELLO, {"model": "m"})
            async with OpenAIChat(base_url=server.base_url, transport=transport) as plain:
                ok = await plain.complete(HELLO, model="m")
    assert server.stats.paid == 2 and len(ok.text) == 2 * 2**20


@pytest.mark.parametrize("cap", [0, -1, True, 2.5])
def test_a_nonsense_size_cap_is_a_config_error(cap: object) -> None:
    with pytest.raises(ConfigError, match="max_response_bytes"):
        OpenAIChat(base_url="http://127.0.0.1:9/v1", max_response_bytes=cap)  # type: ignore[arg-type]
