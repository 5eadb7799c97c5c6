"""Hedged requests against a heavy-tailed provider (issue #25, item 5).

The provider is in-process (a `ScriptedModel` whose answer sleeps): each request's
latency is lognormal, median 0.5 s, sigma 1, drawn from a generator seeded by the
request's content and its attempt number, so every run (and every client) sees the same
draws, and a hedge's duplicate is a fresh draw as it is at a real provider.  Each
configuration evaluates ``--n`` examples with ``--concurrency`` in flight (the endpoint's
concurrency limit too unless ``--limit`` says otherwise, so a duplicate waits for a slot
like any request); each seed is another set of draws, run plain then hedged.  The
"ideal" columns are zero-overhead bounds on the same draws (a simulation): hedging at the
true p95 only, and with the engine's early rule on idle capacity as well (`ideal_tail`);
how much hedging can save depends on where the draws put the slowest requests.

    python benchmarks/hedging.py                      # 1,000 examples at 50, ~40 s
    python benchmarks/hedging.py --seeds 0 1 2 3 4 --hedge-after p95 1.5 --limit 60
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import os
import random
import time
from typing import Any

import anyio

from adapters import ScriptedModel, ScriptedRequest
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate
from engine.endpoint._hedge import EARLY_ALLOWANCE, EARLY_SHARE
from engine.metrics import ExactMatch

MEDIAN, SIGMA = 0.5, 1.0


def heavy_tail_latency(text: str, attempt: int, seed: int = 0) -> float:
    """Seconds for a request: lognormal (median 0.5 s, sigma 1), fixed by the request's
    text, its attempt number and the scenario's seed."""
    digest = hashlib.blake2b(f"{seed}\0{attempt}\0{text}".encode(), digest_size=8)
    rng = random.Random(int.from_bytes(digest.digest(), "big"))
    return MEDIAN * math.exp(rng.gauss(0.0, SIGMA))


def heavy_tail_model(seed: int) -> ScriptedModel:
    async def answer(request: ScriptedRequest) -> str:
        await anyio.sleep(heavy_tail_latency(request.text, request.attempt, seed))
        return request.messages[-1]["content"]

    return ScriptedModel(answer, name="heavy-tail")


def _parse_hedge(value: str) -> float | str | None:
    if value in ("none", "off"):
        return None
    return value if value == "p95" else float(value)


def ideal(n: int, concurrency: int, seed: int, hedge_after: float | None) -> float:
    """The finish time of a zero-overhead client with ``concurrency`` workers on the same
    draws, a duplicate at ``hedge_after`` taking no worker's slot: the bound."""
    free = [0.0] * concurrency
    end = 0.0
    for i in range(n):
        start = heapq.heappop(free)
        text = f"Echo.\nitem {i}"
        took = heavy_tail_latency(text, 1, seed)
        if hedge_after is not None and took > hedge_after:
            took = min(took, hedge_after + heavy_tail_latency(text, 2, seed))
        heapq.heappush(free, start + took)
        end = max(end, start + took)
    return end


def ideal_tail(n: int, concurrency: int, seed: int, p95: float, p75: float) -> tuple[float, int]:
    """`ideal` at the true p95, plus the engine's rule on idle capacity: once the last
    example has started and a slot has come free, a call past the true p75 gets its
    duplicate at once, at most ``EARLY_SHARE * n + EARLY_ALLOWANCE`` of them (longest
    running first): the finish time and the duplicates sent."""
    free = [0.0] * concurrency
    calls = []
    for i in range(n):
        start = heapq.heappop(free)
        text = f"Echo.\nitem {i}"
        took, again = heavy_tail_latency(text, 1, seed), heavy_tail_latency(text, 2, seed)
        calls.append((start, took, again))
        heapq.heappush(free, start + (min(took, p95 + again) if took > p95 else took))
    last = calls[-1][0]
    idle = min(end for end in free if end > last)  # the first slot nobody takes again
    budget = EARLY_SHARE * n + EARLY_ALLOWANCE
    early = hedges = 0
    end = 0.0
    for due, start, took, again in sorted((max(s + p75, idle), s, t, a) for s, t, a in calls):
        done = start + took
        if due < min(done, start + p95) and early < budget:
            early, hedges = early + 1, hedges + 1
            done = min(done, due + again)
        elif took > p95:
            hedges += 1
            done = min(done, start + p95 + again)
        end = max(end, done)
    return end, hedges


async def run(
    n: int, concurrency: int, limit: int, seed: int, hedge_after: float | str | None
) -> dict[str, Any]:
    prompt = Prompt(
        [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}],
        model="heavy-tail",
    )
    examples = [Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}") for i in range(n)]
    model = heavy_tail_model(seed)
    retry = RetryPolicy(hedge_after=hedge_after)  # type: ignore[arg-type]
    endpoint = Endpoint(model, limits=Limits(concurrency=limit), retry=retry)
    started = time.perf_counter()
    result = await evaluate(
        prompt, examples, model=endpoint, metric=ExactMatch(), concurrency=concurrency
    )
    wall = time.perf_counter() - started
    assert result.completed == n and result.score == 1.0, result
    stats = endpoint.statistics()
    delay = endpoint.hedger.delay() if endpoint.hedger is not None else None
    return {
        "seed": seed,
        "hedge_after": hedge_after,
        "wall_s": wall,
        "requests": model.calls,
        "extra": model.calls / n - 1,
        "hedges": result.hedges,
        "hedges_won": stats.hedges_won,
        "early": endpoint.hedger.early if endpoint.hedger is not None else 0,
        "final_delay_s": delay,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="latency draws")
    parser.add_argument(
        "--limit", type=int, help="the endpoint's concurrency limit (default: --concurrency)"
    )
    parser.add_argument("--hedge-after", nargs="+", default=["p95"], type=_parse_hedge)
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    print(f"load average before: {os.getloadavg()[0]:.2f} (2 cores)", flush=True)
    limit = args.limit or args.concurrency
    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for hedge in [None, *args.hedge_after]:
            row = anyio.run(run, args.n, args.concurrency, limit, seed, hedge)
            row["load"] = os.getloadavg()[0]
            rows.append(row)
            print(
                f"seed {seed} hedge_after={row['hedge_after']!s:>5}: {row['wall_s']:6.2f} s, "
                f"{row['requests']} requests (+{row['extra']:.1%}), hedges {row['hedges']} "
                f"(won {row['hedges_won']}, early {row['early']}), "
                f"final delay {row['final_delay_s']}, load {row['load']:.2f}",
                flush=True,
            )
    print(f"\n{args.n} examples, {args.concurrency} in flight, endpoint limit {limit}\n")
    print(
        "| draws (seed) | hedge_after | wall | vs no hedging | ideal: no hedging / hedging at "
        "the true p95 | ideal: p95 + early on idle capacity (extra) | extra requests "
        "| hedges (won, early) | load |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    p95 = MEDIAN * math.exp(SIGMA * 1.6448536)
    p75 = MEDIAN * math.exp(SIGMA * 0.6744898)
    for row in rows:
        seed = row["seed"]
        plain = next(r for r in rows if r["seed"] == seed and r["hedge_after"] is None)
        label = "off" if row["hedge_after"] is None else str(row["hedge_after"])
        bound = ideal(args.n, args.concurrency, seed, None)
        hedged = ideal(args.n, args.concurrency, seed, p95)
        tail, tail_hedges = ideal_tail(args.n, args.concurrency, seed, p95, p75)
        print(
            f"| {seed} | {label} | {row['wall_s']:.2f} s | {plain['wall_s'] / row['wall_s']:.2f}x "
            f"| {bound:.2f} s / {hedged:.2f} s ({bound / hedged:.2f}x) "
            f"| {tail:.2f} s ({bound / tail:.2f}x, +{tail_hedges / args.n:.1%}) "
            f"| {row['extra']:.1%} | {row['hedges']} ({row['hedges_won']}, {row['early']}) "
            f"| {row['load']:.2f} |"
        )


if __name__ == "__main__":
    main()
