"""Programs under the rate limit: a two-call program (extract, then answer) on 1,000
examples through `OpenAIChat` against the simulated provider at RPM 3000.

The bound is the time the provider's rate needs for the work: 2 calls per example,
2,000 calls at 50 per second = 40 s.  The provider runs in its own process
(`adapters.simulated_process`), as in `benchmarks/throughput.py`.

    python benchmarks/programs.py [--n 1000] [--rpm 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from adapters.openai_chat import OpenAIChat
from adapters.simulated_process import fetch_stats, simulated_provider_process
from engine import Cache, Example, Limits, Prompt, evaluate
from engine.metrics import ExactMatch

PROMPTS = {
    "extract": Prompt([{"role": "user", "content": "{text}"}], model="sim"),
    "answer": Prompt([{"role": "user", "content": "{facts}"}], model="sim"),
}


async def pipeline(lm: Any, example: Example) -> str:
    facts = await lm("extract", text=example.inputs["text"])
    return str(await lm("answer", facts=facts))


async def run(n: int, rpm: int) -> dict[str, Any]:
    data = [Example({"text": f"row {i}"}, f"row {i}", id=f"r{i}") for i in range(n)]
    config: dict[str, float] = dict(rpm=rpm, latency_median=0.05, latency_sigma=0.5, seed=7)
    async with simulated_provider_process(**config) as root:
        async with OpenAIChat(
            base_url=root + "/v1", limits=Limits(rpm=rpm, concurrency=100)
        ) as chat:
            started = time.perf_counter()
            result = await evaluate(
                PROMPTS, data, program=pipeline, model=chat, metric=ExactMatch(), cache=Cache()
            )
            wall = time.perf_counter() - started
        stats = await fetch_stats(root)
    bound = 2 * n / (rpm / 60)
    return {
        "n": n,
        "calls_per_example": 2,
        "wall_s": round(wall, 2),
        "bound_s": round(bound, 2),
        "fraction_of_bound": round(bound / wall, 3),
        "completed": result.completed,
        "errors": result.errors,
        "lost": result.lost,
        "paid": stats["paid"],
        "received": stats["received"],
        "rate_limited": stats["rate_limited"],
        "share_429": round(stats["rate_limited"] / max(stats["received"], 1), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--rpm", type=int, default=3000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.n, args.rpm)), indent=2))


if __name__ == "__main__":
    main()
