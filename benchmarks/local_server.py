"""A local model server that serves one request at a time (issue #26).

The simulated provider with ``slots=1`` (0.2 s per request; a request whose client
timed out while queued is still served and billed, as llama.cpp does), 60 examples at
``Limits(concurrency=16)`` with a 2 s timeout, adaptive concurrency on and off.  The
ideal is 60 x 0.2 = 12 s and 60 requests.

    python benchmarks/local_server.py [--examples 60] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from adapters import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate
from engine.metrics import ExactMatch


async def one_run(adaptive: bool, examples: int, concurrency: int) -> dict[str, Any]:
    prompt = Prompt([{"role": "user", "content": "{question}"}], model="local")
    data = [Example({"question": f"q{i}"}, f"q{i}", id=str(i)) for i in range(examples)]
    levels: list[int] = []
    async with SimulatedServer(ServerConfig(slots=1, latency_median=0.2)) as server:
        async with OpenAIChat(base_url=server.base_url) as chat:
            limits = Limits(concurrency=concurrency, adaptive_concurrency=adaptive)
            endpoint = Endpoint(chat, limits=limits, retry=RetryPolicy(timeout=2.0))
            started = time.monotonic()
            result = await evaluate(
                prompt,
                data,
                model=endpoint,
                metric=ExactMatch(),
                on_event=lambda e: levels.append(int(e.data["concurrency"]))
                if e.name == "endpoint.concurrency"
                else None,
            )
            wall = time.monotonic() - started
        await asyncio.sleep(0.5)  # let the server finish what clients gave up on
    return {
        "adaptive": adaptive,
        "wall_s": round(wall, 2),
        "ideal_s": round(examples * 0.2, 2),
        "of_ideal": round(wall / (examples * 0.2), 3),
        "errors": result.errors,
        "timeouts": result.timeouts,
        "requests_received": server.stats.received,
        "requests_paid": server.stats.paid,
        "levels": levels,
    }


async def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    rows = [await one_run(a, args.examples, args.concurrency) for a in (True, False)]
    for row in rows:
        sys.stdout.write(json.dumps(row) + "\n")
    return rows


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    asyncio.run(run())
