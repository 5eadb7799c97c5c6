"""Rate-bound fraction and client CPU per request, one row per provider dialect (issue 21).

The simulated provider runs in its own process (``python -m adapters.simulated_server``,
which serves the OpenAI, Anthropic and Gemini dialects routed by path), a fresh one per
row; the client runs `evaluate` over ``--n`` examples through the row's adapter.  Bound =
N / the binding rate: RPM, or for Anthropic the tighter of RPM, ITPM / input tokens per
request and OTPM / output tokens per request (tokens as the server billed them).
Fraction = bound / wall (1.0 = at the bound).  Client CPU is this process's user + sys
time over the run, per request the server received.  The litellm row imports litellm
before the timing starts (a one-time cost of about 2 s).

    python benchmarks/providers.py                 # every row, ~3 minutes
    python benchmarks/providers.py --rows anthropic anthropic-headers --n 500
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections.abc import Callable
from typing import Any

from adapters.simulated_process import fetch_stats, simulated_provider_process
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate
from engine.metrics import ExactMatch

RPM, ITPM, OTPM = 3000, 150_000, 32_000
PADDING = "Answer with the item named below, exactly as written, and nothing else. " * 3
RETRY = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.5, timeout=5.0)


def _chat(row: str, root: str) -> Any:
    split = {"input_tpm": ITPM, "output_tpm": OTPM}
    if row == "openai":
        from adapters.openai_chat import OpenAIChat

        return OpenAIChat(base_url=root + "/v1", limits=Limits(rpm=RPM, concurrency=64))
    if row == "anthropic":
        from adapters.anthropic import AnthropicChat

        return AnthropicChat(base_url=root, limits=Limits(rpm=RPM, concurrency=64, **split))
    if row == "anthropic-headers":
        from adapters.anthropic import AnthropicChat

        return AnthropicChat(base_url=root, limits=Limits(concurrency=64))
    if row == "gemini":
        from adapters.gemini import GeminiChat

        return GeminiChat(base_url=root, limits=Limits(rpm=RPM, concurrency=64))
    if row == "litellm":
        from adapters.litellm_chat import LiteLLMChat, load_litellm

        load_litellm()  # its import (about 2 s) is a one-time cost, outside the timing
        return LiteLLMChat(
            model="openai/demo",
            api_base=root + "/v1",
            api_key="sk-simulated",
            limits=Limits(rpm=RPM, concurrency=64),
        )
    raise SystemExit(f"unknown row {row!r}")


def _server_options(row: str) -> dict[str, float | str]:
    options: dict[str, float | str] = {"rpm": RPM, "latency_median": 0.05, "latency_sigma": 0.5}
    if row.startswith("anthropic"):
        options.update(input_tpm=ITPM, output_tpm=OTPM)
    return options


def _bound(row: str, n: int, input_per: float, output_per: float) -> float:
    rate = RPM / 60
    if row.startswith("anthropic"):
        rate = min(rate, ITPM / 60 / input_per, OTPM / 60 / output_per)
    return n / rate


async def run_row(row: str, n: int) -> dict[str, Any]:
    prompt = Prompt(
        [{"role": "system", "content": PADDING}, {"role": "user", "content": "{question}"}],
        model="demo",
        temperature=0.0,
        params={"max_tokens": 32},
    )
    text = "item {} of the long list of items"
    data = [Example({"question": text.format(i)}, text.format(i), id=f"b{i}") for i in range(n)]
    async with simulated_provider_process(**_server_options(row)) as root:
        chat = _chat(row, root)
        endpoint = Endpoint(chat, retry=RETRY)
        cpu: Callable[[], float] = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731
        cpu0, wall0 = cpu(), time.perf_counter()
        result = await evaluate(prompt, data, model=endpoint, metric=ExactMatch())
        wall, used = time.perf_counter() - wall0, cpu() - cpu0
        await chat.aclose()
        stats = await fetch_stats(root)
    usage = endpoint.statistics().usage
    bound = _bound(row, n, usage.prompt_tokens / n, usage.completion_tokens / n)
    return {
        "row": row,
        "wall": wall,
        "bound": bound,
        "fraction": bound / wall,
        "lost": n - result.scored,
        "score": result.score,
        "rate_limited": stats["rate_limited"],
        "received": stats["received"],
        "cpu_ms": 1000 * used / max(1, stats["received"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rows = ("openai", "anthropic", "anthropic-headers", "gemini", "litellm")
    parser.add_argument("--rows", nargs="+", default=list(rows), choices=rows)
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    print(
        "| dialect | wall | bound | fraction of bound | lost | score | 429s / received "
        "| client CPU per request |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in args.rows:
        r = asyncio.run(run_row(row, args.n))
        print(
            f"| {r['row']} | {r['wall']:.2f} s | {r['bound']:.2f} s | **{r['fraction']:.3f}** "
            f"| {r['lost']} | {r['score']:.3f} | {r['rate_limited']} / {r['received']} "
            f"| {r['cpu_ms']:.2f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
