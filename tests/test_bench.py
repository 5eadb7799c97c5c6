"""`textgrad bench RUN.toml`: the endpoint benchmark against the simulated provider,
over real HTTP on loopback, counted at the server."""

from __future__ import annotations

from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer


async def test_simulated_server_honours_max_tokens() -> None:
    """The provider cuts an answer at max_tokens and says so, as real ones do (the
    bench's cost cap counts on it)."""
    async with SimulatedServer(ServerConfig()) as server:
        async with OpenAIChat(base_url=server.base_url) as chat:
            long = "x" * 400
            cut = await chat.complete([{"role": "user", "content": long}], model="m", max_tokens=10)
            whole = await chat.complete([{"role": "user", "content": long}], model="m")
    assert cut.usage.completion_tokens == 10 and cut.finish_reason == "length"
    assert whole.usage.completion_tokens == 101 and whole.text == long
