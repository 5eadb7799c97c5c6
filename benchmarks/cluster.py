"""The engine on a local Ray cluster against the targets of issue #12.

Scenarios (``--scenario``, default all, in this order):

- ``cpu``: a metric that burns 5 ms of pure-Python CPU per example, 4,000 examples,
  the simulated provider at latency 0.05 s and no rate limit; the same evaluation
  in-process and on 2 workers of a cluster already started, alternating, ``--rounds``
  times.  Target: cluster >= 1.6x in-process.
- ``limit``: 4 workers, ``Limits(rpm=3000)`` on the adapter, 2,000 examples, a
  provider that enforces 3,000 RPM itself.  Targets: >= 0.95 of N / rate, <= 1% 429s
  at the server, 0 lost.
- ``kill``: 2 workers, 2,000 examples, the shared PostgreSQL cache; one worker
  process SIGKILLed half-way.  Targets: the run completes, every example has exactly
  one outcome, repeated paid calls <= that worker's concurrency.
- ``resume``: the same evaluation (2,000 examples, a JSONL file) run by a new cluster
  against the PostgreSQL cache of a first one.  Target: the second pays 0 calls.
- ``lease``: what one lease of the budget actor costs (round trip, actor and caller
  CPU), 2,000 leases in a row, and the budget's own logic without Ray.
- ``rss``: a JSONL file of 10^4 and of 10^6 rows evaluated on 2 workers (instant
  scripted provider in the workers, outcomes streamed to a JSONL file as the CLI
  does), each driver in a fresh process.  Target: peak driver RSS at 10^6 within 1.2x
  of 10^4.

The provider runs in its own process (``python -m adapters.simulated_server``).  The
PostgreSQL server is ``--url`` / ``$PG_URL``, or one this script starts with
scripts/postgres.sh.  Ray runs on this machine (``num_cpus=2``).

    .venv/bin/python benchmarks/cluster.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio

from adapters import OpenAIChat
from adapters.simulated_process import fetch_stats as server_stats
from adapters.simulated_process import simulated_provider_process as provider
from engine import Cache, Example, Limits, MetricResult, PostgresStore, Prompt, evaluate
from engine.cluster import FileDataset, RayCluster
from engine.testing import ScriptedModel, ScriptedRequest

ROOT = Path(__file__).resolve().parents[1]

PROMPT = Prompt(
    [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}],
    model="sim",
)


def data(n: int, prefix: str = "x") -> list[Example]:
    return [Example({"question": f"item {i}"}, f"item {i}", id=f"{prefix}{i}") for i in range(n)]


def write_jsonl(path: Path, n: int) -> None:
    with path.open("w") as handle:
        for i in range(n):
            handle.write(f'{{"id": "f{i}", "question": "item {i}", "expected": "item {i}"}}\n')


def busy_metric(example: Example, prediction: str) -> MetricResult:
    """5 ms of pure-Python CPU (this thread's own CPU time, whatever else runs)."""
    start = time.thread_time()
    spins = 0
    while time.thread_time() - start < 0.005:
        spins += 1
    return MetricResult(1.0 if prediction == example.expected else 0.0)


def exact(example: Example, prediction: str) -> MetricResult:
    return MetricResult(1.0 if prediction == example.expected else 0.0)


exact.inline = True  # type: ignore[attr-defined]  # microseconds: no thread hop


def echo(request: ScriptedRequest) -> str:
    return request.messages[-1]["content"]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- scenarios ---------------------------------------------------------------------------
async def scenario_cpu(rounds: int) -> dict[str, Any]:
    import psutil

    n, runs = 4000, {"in-process": [], "cluster": []}  # type: ignore[var-annotated]
    async with (
        provider(latency_median=0.05) as root,
        RayCluster("local", workers=2, num_cpus=2) as cluster,
    ):
        workers = [psutil.Process(pid) for pid in await cluster.pids()]

        def worker_cpu() -> float:
            return sum(sum(w.cpu_times()[:2]) for w in workers)

        # One adapter for every run, as an optimize run uses one for all its evaluations
        # (a cluster keeps one rate budget actor per adapter).  Warm up (not timed): the
        # workers import the SDK on their first job, as the driver already has.
        model = OpenAIChat(base_url=f"{root}/v1", limits=Limits(concurrency=32))
        await evaluate(PROMPT, data(64), model=model, metric=busy_metric, cluster=cluster)
        for _ in range(rounds):
            for name in ("in-process", "cluster"):
                started, cpu, remote = time.monotonic(), cpu_seconds(), worker_cpu()
                result = await evaluate(
                    PROMPT, data(n), model=model, metric=busy_metric,
                    cluster=cluster if name == "cluster" else None,
                )  # fmt: skip
                runs[name].append(
                    {
                        "wall": round(time.monotonic() - started, 2),
                        "driver_cpu": round(cpu_seconds() - cpu, 2),
                        "workers_cpu": round(worker_cpu() - remote, 2),
                        "load": round(os.getloadavg()[0], 2),
                    }
                )
                assert result.completed == n and result.errors == 0, result
        await model.aclose()
    walls = {name: [r["wall"] for r in rows] for name, rows in runs.items()}
    return {
        "scenario": "cpu",
        "n": n,
        "cpus": os.cpu_count(),
        "runs": runs,
        "speedup_median": statistics.median(walls["in-process"])
        / statistics.median(walls["cluster"]),
        "speedup_best": min(walls["in-process"]) / min(walls["cluster"]),
    }


async def scenario_limit() -> dict[str, Any]:
    n, rpm = 2000, 3000
    async with (
        provider(rpm=rpm, latency_median=0.05) as root,
        RayCluster("local", workers=4, worker_cpus=0.5, num_cpus=2) as cluster,
    ):
        # Warm up (not timed, another endpoint): the workers import the SDK once.
        warm = OpenAIChat(base_url=f"{root}/v1", limits=Limits(rpm=rpm, concurrency=32))
        await evaluate(PROMPT, data(8, "w"), model=warm, metric=exact, cluster=cluster)
        await warm.aclose()
        await anyio.sleep(2.0)  # the provider's bucket refills
        model = OpenAIChat(base_url=f"{root}/v1", limits=Limits(rpm=rpm, concurrency=32))
        before = await server_stats(root)
        started = time.monotonic()
        result = await evaluate(PROMPT, data(n), model=model, metric=exact, cluster=cluster)
        wall = time.monotonic() - started
        await model.aclose()
        stats = await server_stats(root)
        budget = await cluster.budget_statistics(model)
    bound = n / (rpm / 60)
    return {
        "scenario": "limit",
        "n": n,
        "wall": wall,
        "fraction_of_bound": bound / wall,
        "server_429": stats["rate_limited"] - before["rate_limited"],
        "server_received": stats["received"] - before["received"],
        "share_429": (stats["rate_limited"] - before["rate_limited"])
        / (stats["received"] - before["received"]),
        "max_per_second": stats["max_per_second"],
        "lost": n - result.completed,
        "errors": result.errors,
        "leases": budget["leases"],
    }


async def scenario_kill(url: str, flush_interval: float) -> dict[str, Any]:
    n, concurrency = 2000, 16
    table = "bench_" + uuid.uuid4().hex[:10]
    async with (
        provider(latency_median=0.05) as root,
        RayCluster("local", workers=2, num_cpus=2) as cluster,
        Cache(PostgresStore(url, table=table, flush_interval=flush_interval)) as cache,
    ):
        model = OpenAIChat(base_url=f"{root}/v1", limits=Limits(concurrency=concurrency))
        killed: list[float] = []

        async def kill_half_way() -> None:
            while (await server_stats(root))["paid"] < n // 2:  # noqa: ASYNC110 - another process
                await anyio.sleep(0.05)
            os.kill((await cluster.pids())[0], signal.SIGKILL)
            killed.append(time.monotonic())

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_half_way)
            result = await evaluate(
                PROMPT, data(n), model=model, metric=exact, cache=cache, cluster=cluster
            )
        wall = time.monotonic() - started
        await model.aclose()
        stats = await server_stats(root)
        restarts = cluster.restarts
    indexes = [o.index for o in result.outcomes]
    return {
        "scenario": "kill",
        "flush_interval": flush_interval,
        "n": n,
        "wall": wall,
        "completed": result.completed,
        "exactly_once": sorted(indexes) == list(range(n)) and len(set(indexes)) == n,
        "paid": stats["paid"],
        "repeated": stats["repeats"],
        "worker_concurrency": concurrency // 2,
        "restarts": restarts,
        "killed": bool(killed),
    }


async def scenario_resume(url: str) -> dict[str, Any]:
    n = 2000
    table = "bench_" + uuid.uuid4().hex[:10]
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "data.jsonl"
        write_jsonl(path, n)
        async with provider(latency_median=0.05) as root:
            for _ in range(2):  # a new cluster each time
                before = (await server_stats(root))["paid"]
                async with (
                    RayCluster("local", workers=2, num_cpus=2) as cluster,
                    Cache(PostgresStore(url, table=table)) as cache,
                ):
                    model = OpenAIChat(base_url=f"{root}/v1", limits=Limits(concurrency=32))
                    result = await evaluate(
                        PROMPT, FileDataset(path), model=model, metric=exact, cache=cache,
                        cluster=cluster,
                    )  # fmt: skip
                    await model.aclose()
                paid = (await server_stats(root))["paid"] - before
                runs.append({"paid": paid, "calls": result.calls, "hits": result.cache_hits})
    return {"scenario": "resume", "n": n, "first": runs[0], "second": runs[1]}


async def scenario_lease(count: int = 2000) -> dict[str, Any]:
    """The cost of one lease: a call to the budget actor, sequentially, ``count`` times."""
    import psutil
    import ray

    from engine.cluster._rates import Ask, RateBudget

    async with RayCluster("local", workers=1, num_cpus=2):
        budget = ray.remote(RateBudget).options(num_cpus=0).remote(Limits(rpm=6e9))
        pid = await budget.__ray_call__.remote(lambda actor: os.getpid())
        actor = psutil.Process(pid)
        before, cpu, started = sum(actor.cpu_times()[:2]), cpu_seconds(), time.monotonic()
        for _ in range(count):
            await budget.lease.remote(Ask(want=1))
        wall = time.monotonic() - started
        actor_cpu, caller_cpu = sum(actor.cpu_times()[:2]) - before, cpu_seconds() - cpu
        ray.kill(budget)
    plain = RateBudget(Limits(rpm=6e9))
    logic = time.perf_counter()
    for _ in range(100_000):
        plain.lease(Ask(want=1))
    logic = (time.perf_counter() - logic) / 100_000
    return {
        "scenario": "lease",
        "round_trip_us": wall / count * 1e6,
        "actor_cpu_us": actor_cpu / count * 1e6,
        "caller_cpu_us": caller_cpu / count * 1e6,
        "logic_us": logic * 1e6,
    }


def scenario_rss(sizes: list[int]) -> dict[str, Any]:
    peaks = {}
    with tempfile.TemporaryDirectory() as folder:
        for rows in sizes:
            path = Path(folder) / f"rows-{rows}.jsonl"
            write_jsonl(path, rows)
            out = subprocess.run(
                [sys.executable, __file__, "--rss-driver", str(path)],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
            )
            peaks[rows] = json.loads(out.stdout.strip().splitlines()[-1])
            path.unlink()
    small, large = min(sizes), max(sizes)
    ratio = peaks[large]["peak_rss_mb"] / peaks[small]["peak_rss_mb"]
    return {"scenario": "rss", "runs": peaks, "ratio": ratio}


async def rss_driver(path: str) -> dict[str, Any]:
    """One driver (its own process): a file through 2 workers, outcomes to a file."""
    started = time.monotonic()
    async with RayCluster("local", workers=2, num_cpus=2) as cluster:
        with open(path + ".out", "w") as sink:  # noqa: ASYNC230 - written as the CLI does

            def write(outcome: Any) -> None:
                sink.write(json.dumps(outcome.to_dict()) + "\n")

            result = await evaluate(
                PROMPT, FileDataset(path), model=ScriptedModel(echo, keep_requests=False),
                metric=exact, keep_outcomes=False, on_outcome=write, cluster=cluster,
            )  # fmt: skip
    os.unlink(path + ".out")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "rows": result.completed,
        "score": result.score,
        "wall": round(time.monotonic() - started, 1),
        "driver_cpu": round(cpu_seconds(), 1),
        "peak_rss_mb": round(peak, 1),
    }


# -- running -----------------------------------------------------------------------------
@contextmanager
def postgres(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    try:
        from benchmarks.pg_cache import _start_server
    except ModuleNotFoundError:  # `python benchmarks/cluster.py`: its folder is on the path
        from pg_cache import _start_server  # type: ignore[import-not-found,no-redef]

    started, env = _start_server()
    try:
        yield started
    finally:
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", env["PG_PORT"]],
            env=env,
            check=False,
            capture_output=True,
        )


async def run(args: argparse.Namespace, url: str | None) -> list[dict[str, Any]]:
    results = []
    everything = ["cpu", "limit", "kill", "resume", "lease", "rss"]
    wanted = everything if args.scenario == "all" else args.scenario.split(",")
    for name in wanted:
        if name == "cpu":
            results.append(await scenario_cpu(args.rounds))
        elif name == "limit":
            results.append(await scenario_limit())
        elif name == "kill":
            assert url is not None
            for flush in args.flush_intervals[:-1]:
                results.append(await scenario_kill(url, flush))
                print(json.dumps(results[-1]), flush=True)
            results.append(await scenario_kill(url, args.flush_intervals[-1]))
        elif name == "resume":
            assert url is not None
            results.append(await scenario_resume(url))
        elif name == "lease":
            results.append(await scenario_lease())
        elif name == "rss":
            results.append(scenario_rss(args.rss_sizes))
        print(json.dumps(results[-1]), flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="all", help="comma-separated, or all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--url", default=os.environ.get("PG_URL"))
    parser.add_argument("--flush-intervals", type=float, nargs="+", default=[0.2, 0.02])
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--rss-driver", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_driver:
        print(json.dumps(anyio.run(rss_driver, args.rss_driver)))
        return 0
    needs_pg = args.scenario == "all" or {"kill", "resume"} & set(args.scenario.split(","))
    if needs_pg:
        with postgres(args.url) as url:
            anyio.run(run, args, url)
    else:
        anyio.run(run, args, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
