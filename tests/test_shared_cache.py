"""`Cache` over a store shared by processes: single flight across them (claims).

The server is the one tests/test_postgres.py starts (or ``$PG_URL``).  Every test works
in tables of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import anyio
import pytest

from engine import Cache, Endpoint, PostgresStore, RetryPolicy, TransientError, evaluate
from engine.metrics import ExactMatch
from engine.testing import ScriptedModel, ScriptedRequest

from .conftest import echo_examples, echo_model, qa_prompt
from .support import drop_tables

ROOT = Path(__file__).resolve().parents[1]


async def test_two_caches_pay_for_each_prediction_once(pg_url: str, table: str) -> None:
    """Two caches (two stores, as two processes would have) evaluate the same data at
    once: the provider answers each example once; the loser of each claim waits."""
    data, model = echo_examples(30), echo_model(latency=0.2)
    async with (
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02)) as one,
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02)) as two,
    ):
        results = []

        async def run(cache: Cache) -> None:
            results.append(
                await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, one)
            tg.start_soon(run, two)
        stats = [one.statistics(), two.statistics()]
    assert model.calls == 30
    assert sum(r.calls for r in results) == 30
    assert [r.score for r in results] == [1.0, 1.0]
    # every prediction either paid here or served from the other cache's claim
    assert sum(s.misses for s in stats) >= 30


async def test_a_long_call_keeps_its_claim(pg_url: str, table: str) -> None:
    """A call longer than the claim's ttl renews it: the other process keeps waiting
    instead of paying for the same call."""
    model = echo_model(latency=1.5)
    data = echo_examples(1)
    async with (
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02), claim_ttl=0.6) as one,
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02), claim_ttl=0.6) as two,
    ):
        first = []

        async def lead() -> None:
            first.append(
                await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=one)
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(lead)
            await anyio.sleep(0.3)  # the leader holds the claim now
            second = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=two)
    assert model.calls == 1
    assert (first[0].calls, second.calls, second.cache_hits) == (1, 0, 1)


async def test_a_dead_holder_delays_others_by_at_most_the_ttl(pg_url: str, table: str) -> None:
    """A claim whose holder died (never released) expires: the next process pays."""
    model, data = echo_model(), echo_examples(1)
    async with Cache(PostgresStore(pg_url, table=table), claim_ttl=1.0) as cache:
        # the key evaluate will look up for this example
        request = cache.prediction_key(Endpoint.of(model).request_key(qa_prompt()), data[0])
        store = cache.store
        assert isinstance(store, PostgresStore)
        assert await store.claim(request, "a-process-that-died", ttl=1.0)
        started = time.monotonic()
        result = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
        waited = time.monotonic() - started
    assert (model.calls, result.calls, result.score) == (1, 1, 1.0)
    assert 0.5 < waited < 10


async def test_a_failed_or_cancelled_leader_frees_its_key(pg_url: str, table: str) -> None:
    """The leader's call fails: its claim is released at once, and a waiting process
    pays for its own attempt instead of waiting out the ttl."""
    attempts: list[str] = []

    def answer(request: ScriptedRequest) -> str:
        attempts.append(request.messages[-1]["content"])
        if len(attempts) == 1:
            raise TransientError("the first attempt fails", endpoint="scripted")
        return request.messages[-1]["content"]

    failing = ScriptedModel(answer, latency=0.3)
    data = echo_examples(1)
    endpoint = Endpoint(failing, retry=RetryPolicy(max_attempts=1))
    async with (
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02), claim_ttl=30) as one,
        Cache(PostgresStore(pg_url, table=table, flush_interval=0.02), claim_ttl=30) as two,
    ):
        results = {}

        async def run(name: str, cache: Cache, delay: float) -> None:
            await anyio.sleep(delay)
            results[name] = await evaluate(
                qa_prompt(), data, model=endpoint, metric=ExactMatch(), cache=cache
            )

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "first", one, 0.0)
            tg.start_soon(run, "second", two, 0.1)
        elapsed = time.monotonic() - started
    assert results["first"].errors == 1 and results["second"].score == 1.0
    assert len(attempts) == 2
    assert elapsed < 10  # not the 30 s ttl


_PROCESS = textwrap.dedent(
    """
    import json, sys, anyio
    sys.path.insert(0, {root!r})
    from engine import Cache, PostgresStore, evaluate
    from engine.metrics import ExactMatch
    from tests.conftest import echo_examples, echo_model, qa_prompt

    async def main():
        model = echo_model(latency=0.05)
        async with Cache(PostgresStore({url!r}, table={table!r}, flush_interval=0.02)) as cache:
            print("ready", flush=True)
            sys.stdin.readline()  # both processes start together
            result = await evaluate(
                qa_prompt(), echo_examples(60), model=model, metric=ExactMatch(), cache=cache,
                concurrency=8,
            )
        print(json.dumps({{"paid": model.calls, "score": result.score}}))

    anyio.run(main)
    """
)


@pytest.mark.slow
def test_two_processes_evaluating_the_same_data_pay_once(pg_url: str) -> None:
    """Two real processes run the same evaluation on one PostgreSQL cache at once: the
    provider calls they pay add up to the dataset, not twice it."""
    name = "t_" + uuid.uuid4().hex[:12]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PROCESS.format(root=str(ROOT), url=pg_url, table=name)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        anyio.run(drop_tables, pg_url, name)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    done = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sum(d["paid"] for d in done) == 60
    assert [d["score"] for d in done] == [1.0, 1.0]
