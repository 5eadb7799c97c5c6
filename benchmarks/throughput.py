"""Throughput against the simulated provider: the engine beside two peer patterns.

- engine:  `evaluate` through `OpenAIChat` with the engine's limiter and retries.
- waves:   ``asyncio.gather`` over chunks of 50, immediate retries (3), a failure
           scored 0 (the original implementation's pattern).
- threads: a pool of threads calling a synchronous OpenAI client (the SDK's own
           2 retries), a failure scored 0 (thread-based evaluators).

Scenarios (each pattern gets a fresh server with the same seed):

- rate-bound:    RPM 3000, 1,000 examples, latency median 0.05 s; bound = N / rate.
- latency-bound: no RPM, concurrency 100, 5,000 examples, log-normal latency median
                 0.25 s sigma 1; bound = N x mean latency / concurrency.

    python benchmarks/throughput.py [--scenario rate|latency|both] [--scale 1.0]
    python -m engine bench --simulated [--scenario ...]   (the same, from the repository root)

Each provider runs in its own process (`adapters.simulated_process`).
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import structlog

from adapters.openai_chat import OpenAIChat
from adapters.simulated_process import fetch_stats, simulated_provider_process
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate

PROMPT = Prompt(
    [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}], model="sim"
)


def examples(n: int) -> list[Example]:
    return [Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}") for i in range(n)]


def metric(example: Example, prediction: str) -> float:
    return 1.0 if prediction == example.expected else 0.0


# a microsecond metric: scored on the loop, as the built-in string metrics are
metric.inline = True  # type: ignore[attr-defined]


async def run_engine(url: str, data: list[Example], limits: Limits) -> dict[str, Any]:
    async with OpenAIChat(base_url=url, limits=limits) as chat:
        endpoint = Endpoint(chat, retry=RetryPolicy(max_attempts=10, base_delay=0.05, timeout=60))
        result = await evaluate(PROMPT, data, model=endpoint, metric=metric)
    return {"score": result.score, "lost": result.errors, "reported_over": result.scored}


async def run_waves(url: str, data: list[Example], chunk: int = 50) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
    lost = 0

    async def one(example: Example) -> float:
        nonlocal lost
        messages = PROMPT.render(example.inputs)
        for _ in range(3):  # immediate retries, no backoff
            try:
                response = await client.chat.completions.create(model="sim", messages=messages)  # type: ignore[arg-type]
                return metric(example, response.choices[0].message.content or "")
            except openai.OpenAIError:
                continue
        lost += 1
        return 0.0  # the failure is scored as a wrong answer

    scores: list[float] = []
    for start in range(0, len(data), chunk):
        scores += await asyncio.gather(*(one(e) for e in data[start : start + chunk]))
    await client.close()
    return {"score": sum(scores) / len(scores), "lost": lost, "reported_over": len(scores)}


def run_threads(url: str, data: list[Example], workers: int) -> dict[str, Any]:
    client = openai.OpenAI(base_url=url, api_key="none")  # the SDK's default 2 retries
    lost = 0

    def one(example: Example) -> float:
        nonlocal lost
        try:
            messages: Any = PROMPT.render(example.inputs)
            response = client.chat.completions.create(model="sim", messages=messages)
            return metric(example, response.choices[0].message.content or "")
        except openai.OpenAIError:
            lost += 1
            return 0.0

    with ThreadPoolExecutor(max_workers=workers) as pool:
        scores = list(pool.map(one, data))
    client.close()
    return {"score": sum(scores) / len(scores), "lost": lost, "reported_over": len(scores)}


def ideal_makespan(
    n: int, workers: int, median: float, sigma: float, cap: float, seed: int
) -> float:
    """Finish time of a zero-overhead client with ``workers`` slots, given the exact
    latency sequence the seeded provider draws (one ``random()`` then one ``gauss()`` per
    request, as `adapters.simulated_server` does): the bound with the tail included."""
    rng = random.Random(seed)
    slots = [0.0] * workers
    for _ in range(n):
        rng.random()
        latency = min(cap, median * math.exp(sigma * rng.gauss(0, 1)))
        heapq.heappush(slots, heapq.heappop(slots) + latency)
    return max(slots)


async def scenario(name: str, scale: float) -> list[dict[str, Any]]:
    if name == "rate":
        n = int(1000 * scale)
        config: dict[str, float] = dict(rpm=3000, latency_median=0.05, latency_sigma=0.5, seed=7)
        bound = n / (3000 / 60)
        ideal = bound
        limits = Limits(rpm=3000, concurrency=100)
    else:
        n = int(5000 * scale)
        config = dict(latency_median=0.25, latency_sigma=1.0, latency_cap=60.0, seed=7)
        bound = n * 0.25 * math.exp(0.5) / 100
        ideal = ideal_makespan(n, 100, 0.25, 1.0, 60.0, 7)
        limits = Limits(concurrency=100)
    data = examples(n)
    rows = []
    for pattern in ("engine", "waves", "threads"):
        async with simulated_provider_process(**config) as root:
            url = root + "/v1"
            started = time.perf_counter()
            if pattern == "engine":
                out = await run_engine(url, data, limits)
            elif pattern == "waves":
                out = await run_waves(url, data)
            else:
                out = await asyncio.to_thread(run_threads, url, data, 100)
            wall = time.perf_counter() - started
            stats = await fetch_stats(root)
        row = {
            "scenario": name,
            "pattern": pattern,
            "n": n,
            "wall_s": round(wall, 2),
            "bound_s": round(bound, 2),
            "fraction_of_bound": round(bound / wall, 3),
            "ideal_with_tail_s": round(ideal, 2),
            "fraction_of_ideal": round(ideal / wall, 3),
            "lost": out["lost"],
            "score": round(out["score"], 4),
            "http_429": stats["rate_limited"],
            "requests": stats["received"],
            "max_per_second": stats["max_per_second"],
        }
        rows.append(row)
        sys.stdout.write(
            f"{name:>7} {pattern:>7}: wall {wall:7.2f}s  bound {bound:6.2f}s  "
            f"fraction {bound / wall:5.3f} (of ideal {ideal:.2f}s: {ideal / wall:5.3f})  "
            f"lost {out['lost']:4d}  "
            f"429s {stats['rate_limited']:5d}  "
            f"score {out['score']:.4f}  requests {stats['received']}\n"
        )
        sys.stdout.flush()
    return rows


async def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="bench", description="throughput: engine vs peer patterns"
    )
    parser.add_argument("--scenario", choices=("rate", "latency", "both"), default="both")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args(argv)
    names = ["rate", "latency"] if args.scenario == "both" else [args.scenario]
    rows = []
    for name in names:
        rows += await scenario(name, args.scale)
    sys.stdout.write(json.dumps(rows) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point for ``benchmarks/throughput.py`` and ``python -m engine bench --simulated``."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    asyncio.run(run(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
