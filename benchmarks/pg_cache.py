"""The PostgreSQL cache against SQLite and memory: store throughput and evaluate overhead.

1. Store throughput: write N rows (put, then aclose commits), read them back with 64
   concurrent gets, and with get_many in pages of 1,000; PostgresStore and SQLiteStore
   side by side in one run.
2. Per-example overhead of `evaluate` on the instant scripted provider (10^4 examples,
   concurrency 64) with no cache, memory, SQLite and PostgreSQL; "cold" pays every
   call, "warm" reruns with a fresh store object on the filled cache (0 calls).

Each configuration runs in its own subprocess, rounds alternate the order, and the
median of the rounds is reported.  CPU is the client process's user+sys time; for
PostgreSQL the server's CPU (postmaster and every backend, reaped ones included) is
measured too, when the server runs on this machine.

    python benchmarks/pg_cache.py --rows 100000 --n 10000 --rounds 3

Uses ``--url`` or ``$PG_URL``; otherwise starts its own server with scripts/postgres.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# -- measuring ------------------------------------------------------------------------
def _postmaster(url: str) -> int | None:
    """The pid of the PostgreSQL server behind ``url`` if it runs on this machine."""
    import anyio
    import asyncpg
    import psutil

    async def parent_of_backend() -> int | None:
        conn = await asyncpg.connect(url)
        try:  # while the connection is open: its backend exits with it
            backend = psutil.Process(int(await conn.fetchval("SELECT pg_backend_pid()")))
            parent = backend.parent()
            return None if parent is None else parent.pid
        except psutil.Error:
            return None
        finally:
            await conn.close()

    return anyio.run(parent_of_backend)


def _server_cpu(postmaster: int | None) -> float | None:
    """CPU seconds the server has used so far: postmaster, backends, reaped backends."""
    import psutil

    if postmaster is None:
        return None
    try:
        server = psutil.Process(postmaster)
        children = server.children()
        total = 0.0
        for child in children:
            try:
                times = child.cpu_times()
            except psutil.NoSuchProcess:
                continue  # exited: its time is in the postmaster's children_* below
            total += times.user + times.system
        times = server.cpu_times()  # children_*: the backends it has already reaped
        return total + times.user + times.system + times.children_user + times.children_system
    except psutil.Error:
        return None


class _Meter:
    """Client CPU, wall time and server CPU over a block."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster

    def __enter__(self) -> _Meter:
        self.server0 = _server_cpu(self.postmaster)
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0
        end = _server_cpu(self.postmaster)
        self.server = None if end is None or self.server0 is None else end - self.server0


# -- child: store throughput ----------------------------------------------------------
def _store_child(kind: str, rows: int, url: str) -> dict[str, Any]:
    import anyio

    from engine import PostgresStore, SQLiteStore

    table = "bench_" + uuid.uuid4().hex[:10]
    tmp = tempfile.mkdtemp()
    value = json.dumps({"text": "x" * 180, "usage": [40, 12], "inputs": "0" * 16})
    keys = [f"p:{uuid.uuid4().hex}{uuid.uuid4().hex}:e{i}" for i in range(rows)]
    measured = _postmaster(url) if kind == "postgres" else None

    def store() -> Any:
        if kind == "postgres":
            return PostgresStore(url, table=table)
        return SQLiteStore(Path(tmp) / "c.sqlite")

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"store": kind, "rows": rows}
        s = await store().open()
        with _Meter(measured) as write:
            for key in keys:
                await s.put(key, value)
            await s.aclose()
        s = await store().open()
        found = 0

        async def reader(part: list[str]) -> None:
            nonlocal found
            for key in part:
                value = await s.get(key)  # (not `found += await ...`: that races)
                found += value is not None

        with _Meter(measured) as read:
            async with anyio.create_task_group() as tg:
                for w in range(64):
                    tg.start_soon(reader, keys[w::64])
        assert found == rows, found
        if kind == "postgres":
            with _Meter(measured) as many:
                for start in range(0, rows, 1000):
                    assert len(await s.get_many(keys[start : start + 1000])) == len(
                        keys[start : start + 1000]
                    )
            out.update(_rates("get_many", many, rows))
            claims = min(rows, 10_000)

            async def claimer(part: list[str]) -> None:
                for key in part:
                    owner = s.new_owner()
                    assert await s.claim("c" + key, owner, ttl=60)
                    await s.put("c" + key, value)
                    await s.release("c" + key, owner)

            with _Meter(measured) as claimed:
                async with anyio.create_task_group() as tg:
                    for w in range(64):
                        tg.start_soon(claimer, keys[w:claims:64])
                await s.flush()
            out.update(_rates("claim", claimed, claims))
            await _drop(url, table)
        await s.aclose()
        out.update(_rates("write", write, rows))
        out.update(_rates("read", read, rows))
        return out

    try:
        return anyio.run(main)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rates(name: str, meter: _Meter, n: int) -> dict[str, Any]:
    return {
        f"{name}_rows_per_s": n / meter.wall,
        f"{name}_cpu_us_per_row": meter.cpu / n * 1e6,
        f"{name}_server_cpu_us_per_row": None if meter.server is None else meter.server / n * 1e6,
    }


async def _drop(url: str, table: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for suffix in ("", "_meta", "_claims"):
            await conn.execute(f'DROP TABLE IF EXISTS "{table}{suffix}"')
    finally:
        await conn.close()


# -- child: evaluate overhead ---------------------------------------------------------
def _evaluate_child(kind: str, n: int, url: str) -> dict[str, Any]:
    import anyio
    import structlog

    from adapters import ScriptedModel
    from engine import Cache, Example, Limits, PostgresStore, Prompt, evaluate

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    prompt = Prompt(
        [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}],
        model="instant",
    )
    table, tmp = "bench_" + uuid.uuid4().hex[:10], tempfile.mkdtemp()
    measured = _postmaster(url) if kind == "postgres" else None

    def examples() -> Iterator[Example]:
        for i in range(n):
            yield Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}")

    def metric(example: Example, prediction: str) -> float:
        return 1.0 if prediction == example.expected else 0.0

    metric.inline = True  # type: ignore[attr-defined]  # scored on the loop, as built-ins are

    def cache() -> Cache | None:
        if kind == "postgres":
            return Cache(PostgresStore(url, table=table))
        if kind == "sqlite":
            return Cache.sqlite(str(Path(tmp) / "c.sqlite"))
        return Cache() if kind == "memory" else None

    async def run(c: Cache | None, phase: str) -> dict[str, Any]:
        model = ScriptedModel(lambda r: r.messages[-1]["content"], keep_requests=False)
        if c is not None:
            await c.__aenter__()
        with _Meter(measured) as meter:
            result = await evaluate(
                prompt,
                examples(),
                model=model,
                metric=metric,
                cache=c,
                limits=Limits(concurrency=64),
                keep_outcomes=False,
                progress_interval=3600,
            )
            if c is not None:
                await c.aclose()  # the commit of what was written is part of the cost
        assert result.completed == n and result.score == 1.0
        assert model.calls == (n if phase == "cold" or kind == "none" else 0), model.calls
        server = meter.server
        return {
            "cache": kind,
            "phase": phase,
            "n": n,
            "cpu_us_per_example": meter.cpu / n * 1e6,
            "examples_per_s": n / meter.wall,
            "server_cpu_us_per_example": None if server is None else server / n * 1e6,
        }

    async def main() -> list[dict[str, Any]]:
        first = cache()
        rows = [await run(first, "cold")]
        # warm: the same memory cache; a fresh store object on the filled file/table
        rows.append(await run(first if kind == "memory" else cache(), "warm"))
        if kind == "postgres":
            await _drop(url, table)
        return rows

    try:
        return anyio.run(main)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- driver ---------------------------------------------------------------------------
def _child(args: list[str]) -> Any:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _median_rows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The first sample's labels with the median of every measured number."""
    row = dict(samples[0])
    for name, value in samples[0].items():
        if isinstance(value, float):
            values = [s[name] for s in samples if s[name] is not None]
            row[name] = statistics.median(values) if values else None
    row["rounds"] = len(samples)
    return row


def _start_server() -> tuple[str, dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "PG_DIR": tempfile.mkdtemp(prefix="textgrad-bench-pg-")}
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "postgres.sh"), "start", port],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1], {**env, "PG_PORT": port}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def _report(stores: list[dict[str, Any]], evals: list[dict[str, Any]]) -> None:
    print(
        "\n| store | write rows/s | write CPU/row | read rows/s (64 gets) | read CPU/row |"
        " get_many rows/s | server CPU/row (write, read) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in stores:
        server = (
            f"{_fmt(r.get('write_server_cpu_us_per_row'))} us, "
            f"{_fmt(r.get('read_server_cpu_us_per_row'))} us"
            if r["store"] == "postgres"
            else "(in process)"
        )
        print(
            f"| {r['store']} | {_fmt(r['write_rows_per_s'], 0)} | "
            f"{_fmt(r['write_cpu_us_per_row'])} us | {_fmt(r['read_rows_per_s'], 0)} | "
            f"{_fmt(r['read_cpu_us_per_row'])} us | "
            f"{_fmt(r.get('get_many_rows_per_s'), 0)} | {server} |"
        )
    for r in stores:
        if r["store"] == "postgres":
            print(
                f"\nclaim + put + release, 64 at once: {_fmt(r['claim_rows_per_s'], 0)} keys/s, "
                f"client CPU {_fmt(r['claim_cpu_us_per_row'])} us/key, "
                f"server CPU {_fmt(r['claim_server_cpu_us_per_row'])} us/key"
            )
    print("\n| cache | phase | client CPU/example | examples/s | server CPU/example |")
    print("|---|---|---:|---:|---:|")
    for r in evals:
        print(
            f"| {r['cache']} | {r['phase']} | {_fmt(r['cpu_us_per_example'])} us | "
            f"{_fmt(r['examples_per_s'], 0)} | {_fmt(r['server_cpu_us_per_example'])} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", default=os.environ.get("PG_URL"))
    parser.add_argument("--caches", nargs="+", default=["none", "memory", "sqlite", "postgres"])
    parser.add_argument("--child", nargs=4)
    args = parser.parse_args()
    if args.child:
        what, kind, size, url = args.child
        fn = _store_child if what == "store" else _evaluate_child
        print(json.dumps(fn(kind, int(size), url)))
        return
    url, env = (args.url, None) if args.url else _start_server()
    try:
        store_samples: dict[str, list[dict[str, Any]]] = {"sqlite": [], "postgres": []}
        eval_samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            order = list(store_samples) if rnd % 2 == 0 else list(reversed(store_samples))
            for kind in order:
                store_samples[kind].append(_child(["store", kind, str(args.rows), url]))
            caches = args.caches if rnd % 2 == 0 else list(reversed(args.caches))
            for kind in caches:
                for row in _child(["evaluate", kind, str(args.n), url]):
                    eval_samples.setdefault((row["cache"], row["phase"]), []).append(row)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        stores = [_median_rows(s) for s in store_samples.values()]
        evals = [
            _median_rows(eval_samples[(kind, phase)])
            for kind in args.caches
            for phase in ("cold", "warm")
        ]
        _report(stores, evals)
        print(json.dumps({"stores": stores, "evaluate": evals}))
    finally:
        if env is not None:
            subprocess.run(
                ["bash", str(ROOT / "scripts" / "postgres.sh"), "stop", env["PG_PORT"]],
                env=env,
                check=False,
                capture_output=True,
            )
            shutil.rmtree(env["PG_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
