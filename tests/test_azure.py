"""Azure OpenAI deployments and gateways on both transports, against the simulated
server's Azure route (``/openai/deployments/{deployment}/chat/completions``), which
checks ``api-version`` and the ``api-key`` header and records what it received."""

from __future__ import annotations

import pytest

from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import AuthenticationError, BadRequestError, ConfigError, Limits, evaluate
from engine.metrics import ExactMatch

from .conftest import echo_examples, qa_prompt

KEY = "azure-key-0f3c9a7e51d24b6b8e0c4f1a2b3c4d5e"  # no sk- shape, as Azure's are
VERSION = "2024-10-21"
ROUTE = "/openai/deployments/gpt-4o-mini/chat/completions"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(params=["aiohttp", "sdk"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def azure(server: SimulatedServer, transport: str, **options: object) -> OpenAIChat:
    settings: dict[str, object] = {
        "azure_endpoint": server.azure_endpoint,
        "azure_deployment": "gpt-4o-mini",
        "api_version": VERSION,
        "api_key": KEY,
        "transport": transport,
        "limits": Limits(concurrency=8),
        **options,
    }
    return OpenAIChat(**settings)  # type: ignore[arg-type]


async def test_a_deployment_is_reached_with_api_key_and_api_version(transport: str) -> None:
    async with SimulatedServer(ServerConfig(api_key=KEY, api_key_header=True)) as server:
        async with azure(server, transport) as chat:
            result = await evaluate(qa_prompt(), echo_examples(20), model=chat, metric=ExactMatch())
    assert result.score == 1.0 and result.errors == 0
    assert server.stats.routes == {ROUTE: 20} and server.stats.unauthorized == 0
    request = server.stats.last_request
    assert request is not None and request["query"] == {"api-version": VERSION}
    assert request["headers"]["api-key"] == "<secret>" and "authorization" not in request["headers"]
    assert chat.name == f"127.0.0.1:{server.port}/openai/deployments/gpt-4o-mini"


async def test_a_wrong_azure_key_is_an_authentication_error(transport: str) -> None:
    async with SimulatedServer(ServerConfig(api_key=KEY, api_key_header=True)) as server:
        async with azure(server, transport, api_key="wrong-" + KEY) as chat:
            with pytest.raises(AuthenticationError) as info:
                await chat.complete(HELLO, model="m")
    assert server.stats.unauthorized == 1 and KEY not in str(info.value)


async def test_an_entra_id_token_in_headers_replaces_the_key(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    async with SimulatedServer(ServerConfig(api_key=KEY)) as server:  # Bearer only
        chat = azure(server, transport, api_key=None, headers={"Authorization": f"Bearer {KEY}"})
        async with chat:
            completion = await chat.complete(HELLO, model="m")
    assert completion.text == "hello" and server.stats.unauthorized == 0
    assert "api-key" not in server.stats.last_request["headers"]  # type: ignore[index]


async def test_the_server_refuses_an_azure_path_without_api_version(transport: str) -> None:
    """The route really checks: a gateway URL without the version gets Azure's 404."""
    async with SimulatedServer() as server:
        url = f"{server.azure_endpoint}/openai/deployments/gpt-4o-mini"
        async with OpenAIChat(base_url=url, transport=transport) as chat:
            with pytest.raises(BadRequestError, match="Resource not found"):
                await chat.complete(HELLO, model="m")
    assert server.stats.not_found == 1


async def test_gateway_headers_and_query_reach_the_server(transport: str) -> None:
    """``headers=`` override the adapter's own (Authorization included); ``query=``
    parameters ride on every request."""
    gateway_key = "gw-token-7d1e2f3a4b5c6d7e"
    async with SimulatedServer(ServerConfig(api_key=gateway_key)) as server:
        chat = OpenAIChat(
            base_url=server.base_url,
            api_key="sk-not-this-one-000000000",
            headers={"Authorization": f"Bearer {gateway_key}", "X-Team": "search"},
            query={"route": "eu", "tier": "2"},
            transport=transport,
        )
        async with chat:
            completion = await chat.complete(HELLO, model="m")
    request = server.stats.last_request
    assert completion.text == "hello" and server.stats.unauthorized == 0
    assert request is not None and request["headers"]["x-team"] == "search"
    assert request["query"] == {"route": "eu", "tier": "2"}
    assert server.stats.routes == {"/v1/chat/completions": 1}


def test_azure_settings_are_checked_when_the_adapter_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    endpoint = "https://res.openai.azure.com"
    with pytest.raises(ConfigError, match="api_version"):
        OpenAIChat(azure_endpoint=endpoint, azure_deployment="d", api_key=KEY)
    with pytest.raises(ConfigError, match="azure_deployment"):
        OpenAIChat(azure_endpoint=endpoint, api_version=VERSION, api_key=KEY)
    with pytest.raises(ConfigError, match="no Azure credentials"):
        OpenAIChat(azure_endpoint=endpoint, azure_deployment="d", api_version=VERSION)
    with pytest.raises(ConfigError, match="not both"):
        OpenAIChat(
            base_url="https://x/v1", azure_endpoint=endpoint, azure_deployment="d", api_key=KEY
        )
    with pytest.raises(ConfigError, match="need azure_endpoint"):
        OpenAIChat(base_url="https://x/v1", azure_deployment="d", api_key=KEY)
    with pytest.raises(ConfigError, match="headers"):
        OpenAIChat(base_url="https://x/v1", api_key=KEY, headers={"x-n": 1})  # type: ignore[dict-item]


def test_azure_cache_identity_has_deployment_and_version_not_the_key() -> None:
    chat = OpenAIChat(
        azure_endpoint="https://Res.openai.azure.com/",
        azure_deployment="gpt-4o-mini",
        api_version=VERSION,
        api_key=KEY,
    )
    other = OpenAIChat(
        azure_endpoint="https://res.openai.azure.com",
        azure_deployment="gpt-4o",
        api_version=VERSION,
        api_key=KEY,
    )
    assert chat.cache_identity == (
        f"openai-chat:azure:https://res.openai.azure.com/openai/deployments/gpt-4o-mini"
        f"?api-version={VERSION}"
    )
    assert other.cache_identity != chat.cache_identity
    assert KEY not in chat.cache_identity + repr(chat)


async def test_a_gateway_echoing_the_key_does_not_put_it_in_the_error(transport: str) -> None:
    """A key of no known shape, echoed back in an error body, is removed by value."""
    import asyncio

    import orjson

    token = "gw7c1d9e0f2a3b4c5d6e7f8a9b"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = (line.partition(":") for line in head.split("\r\n")[1:])
        sent = {name.lower(): value.strip() for name, _, value in lines}
        await reader.readexactly(int(sent["content-length"]))
        text = f"bad credentials: api-key={sent.get('api-key')} auth={sent.get('x-gateway-auth')}"
        body = orjson.dumps({"error": {"message": text}})
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    chat = OpenAIChat(
        azure_endpoint=f"http://127.0.0.1:{port}",
        azure_deployment="d",
        api_version=VERSION,
        api_key=KEY,
        headers={"X-Gateway-Auth": f"Token {token}"},
        transport=transport,
    )
    async with server, chat:
        with pytest.raises(BadRequestError) as info:
            await chat.complete(HELLO, model="m")
    message = str(info.value)
    assert "bad credentials" in message and "[REDACTED]" in message
    assert KEY not in message and token not in message
