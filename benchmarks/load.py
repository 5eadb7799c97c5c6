"""Load: a 100,000-example evaluation against the simulated provider at a high RPM.

Records wall time against the rate bound, the client's peak RSS, the 429 share and the
examples lost (must be 0).  The provider runs in its own process.

    python benchmarks/load.py --n 100000 --rpm 18000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections.abc import Iterator

import structlog

from adapters.openai_chat import OpenAIChat
from adapters.simulated_process import fetch_stats, simulated_provider_process
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate

PROMPT = Prompt(
    [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}], model="sim"
)


def metric(example: Example, prediction: str) -> float:
    return 1.0 if prediction == example.expected else 0.0


# a microsecond metric: scored on the loop, as the built-in string metrics are
metric.inline = True  # type: ignore[attr-defined]


def examples(n: int) -> Iterator[Example]:
    for i in range(n):
        yield Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--rpm", type=float, default=18_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server = dict(rpm=args.rpm, latency_median=0.05, latency_sigma=0.5, seed=1)
    async with simulated_provider_process(**server) as root:
        limits = Limits(rpm=args.rpm, concurrency=args.concurrency)
        async with OpenAIChat(base_url=root + "/v1", limits=limits) as chat:
            endpoint = Endpoint(chat, retry=RetryPolicy(max_attempts=10, base_delay=0.05))
            started = time.perf_counter()
            result = await evaluate(
                PROMPT,
                examples(args.n),
                model=endpoint,
                metric=metric,
                keep_outcomes=False,
                progress_interval=3600,
            )
            wall = time.perf_counter() - started
        stats = await fetch_stats(root)
    bound = args.n / (args.rpm / 60)
    row = {
        "n": args.n,
        "rpm": args.rpm,
        "wall_s": round(wall, 1),
        "bound_s": round(bound, 1),
        "fraction_of_bound": round(bound / wall, 3),
        "lost": args.n - result.scored,
        "errors": result.errors,
        "score": result.score,
        "http_429_share": round(stats["rate_limited"] / max(stats["received"], 1), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "max_per_second": stats["max_per_second"],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    asyncio.run(main())
