"""PostgresStore on a real PostgreSQL server, the shared-cache protocol, `cache copy`.

The server is ``$PG_URL`` when set (CI starts one), else one this session starts with
``scripts/postgres.sh`` in a temporary directory and stops at the end.  Every test
works in tables of its own, so a shared server needs no cleaning between runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from engine import (
    Cache,
    CacheError,
    ConfigError,
    PostgresStore,
    copy_cache,
    evaluate,
)
from engine._redact import redact_text
from engine.metrics import ExactMatch

from .conftest import echo_examples, echo_model, qa_prompt
from .support import drop_tables, free_port

asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (extra 'postgres')")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "postgres.sh"


async def _sql(url: str, statement: str, *args: Any) -> list[Any]:
    """Run one statement on a connection of its own (another client's view)."""
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def _fill_sqlite(path: Path, n: int) -> None:
    async with Cache.sqlite(str(path)) as cache:
        await evaluate(
            qa_prompt(), echo_examples(n), model=echo_model(), metric=ExactMatch(), cache=cache
        )


def _sqlite_rows(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT key, value FROM kv ORDER BY key").fetchall()
    finally:
        conn.close()


# -- the service script -------------------------------------------------------------


def test_script_start_is_idempotent_and_prints_the_url(pg_server: dict[str, str]) -> None:
    """A second `start` on a running cluster reuses it and prints the same URL."""
    if "port" not in pg_server:
        pytest.skip("the server comes from $PG_URL; this session did not start it")
    env = {**os.environ, "PG_DIR": pg_server["dir"]}
    again = subprocess.run(
        ["bash", str(SCRIPT), "start", pg_server["port"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert again.stdout.strip().splitlines()[-1] == pg_server["url"]
    assert "already running" in again.stderr


# -- the store ------------------------------------------------------------------------


async def test_rerun_with_a_fresh_store_pays_nothing(pg_url: str, table: str) -> None:
    """Everything the first evaluation paid for is served to a new store object."""
    data, first_model, second_model = echo_examples(40), echo_model(), echo_model()
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        first = await evaluate(
            qa_prompt(), data, model=first_model, metric=ExactMatch(), cache=cache
        )
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        second = await evaluate(
            qa_prompt(), data, model=second_model, metric=ExactMatch(), cache=cache
        )
    assert (first_model.calls, first.calls, first.cache_hits) == (40, 40, 0)
    assert (second_model.calls, second.calls, second.cache_hits) == (0, 0, 40)
    assert second.score == first.score == 1.0


async def test_rows_are_json_and_durable_within_a_second(pg_url: str, table: str) -> None:
    """Without closing the store, another connection sees every row half a second later."""
    store = await PostgresStore(pg_url, table=table, flush_interval=0.1).open()
    try:
        cache = Cache(store)
        await evaluate(
            qa_prompt(), echo_examples(5), model=echo_model(), metric=ExactMatch(), cache=cache
        )
        await anyio.sleep(0.5)  # what a crash now would leave
        rows = await _sql(pg_url, f'SELECT key, value FROM "{table}"')
        assert len(rows) == 15  # 5 predictions, 5 metric results, 5 example fingerprints
        for key, value in rows:
            assert key[:2] in {"p:", "m:", "e:"}
            if key.startswith(("p:", "m:")):
                assert isinstance(json.loads(value), dict)
        assert store.statistics()["committed"] == 15 and store.statistics()["pending"] == 0
    finally:
        await store.aclose()


async def test_pending_rows_are_read_back_before_their_commit(pg_url: str, table: str) -> None:
    """get / get_many see a put at once; other clients see it after the commit."""
    async with PostgresStore(pg_url, table=table, flush_interval=30) as store:
        await store.put("a", '"1"')
        assert await store.get("a") == '"1"'
        assert await _sql(pg_url, f'SELECT 1 FROM "{table}"') == []
        await store.flush()
        await store.put("b", '"2"')
        assert await store.get_many(["a", "b", "absent"]) == {"a": '"1"', "b": '"2"'}
        assert await store.get("absent") is None


async def test_close_twice_and_open_again(pg_url: str, table: str) -> None:
    store = PostgresStore(pg_url, table=table)
    await store.aclose()  # never opened: nothing to do
    async with store:
        await store.put("a", '"1"')
    await store.aclose()
    with pytest.raises(CacheError, match="not open"):
        await store.put("b", '"2"')
    async with store:  # the same object opens again
        assert await store.get("a") == '"1"'
        await store.put("b", '"2"')
    async with PostgresStore(pg_url, table=table) as fresh:
        assert await fresh.get_many(["a", "b"]) == {"a": '"1"', "b": '"2"'}


def test_one_store_object_in_two_event_loops(pg_url: str, table: str) -> None:
    """A store opened, closed, then opened in another `anyio.run` (another loop)."""
    store = PostgresStore(pg_url, table=table, flush_interval=0.05)

    async def use(key: str) -> str | None:
        async with store:
            await store.put(key, '"x"')
            await store.flush()
            return await store.get("first")

    assert anyio.run(use, "first") == '"x"'
    assert anyio.run(use, "second") == '"x"'


async def test_scan_pages_through_every_committed_row(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table) as store:
        for i in range(25):
            await store.put(f"k{i:02d}", json.dumps(i))
        await store.flush()
        pages = [page async for page in store.scan(batch_size=10)]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [k for p in pages for k, _ in p] == [f"k{i:02d}" for i in range(25)]


async def test_back_pressure_bounds_the_uncommitted_rows(pg_url: str, table: str) -> None:
    """put() waits for the writer once max_pending rows wait, so memory stays bounded."""
    most = 0
    async with PostgresStore(pg_url, table=table, max_pending=100, flush_interval=5) as store:
        for i in range(1000):
            await store.put(f"k{i}", "{}")
            most = max(most, store.statistics()["pending"])
        batches = store.statistics()["batches"]
    assert most <= 100 and batches >= 10  # drained in early batches, not after 5 s
    assert (await _sql(pg_url, f'SELECT count(*) FROM "{table}"'))[0][0] == 1000


async def test_two_writers_of_the_same_keys_do_not_deadlock(pg_url: str, table: str) -> None:
    """Workers storing overlapping keys in different orders commit without a retry."""
    keys = [f"p:{i:05d}" for i in range(2000)]
    async with (
        PostgresStore(pg_url, table=table) as one,
        PostgresStore(pg_url, table=table) as two,
    ):
        for rnd in range(5):
            for key in keys:
                await one.put(key, f'"{rnd} one"')
            for key in reversed(keys):
                await two.put(key, f'"{rnd} two"')
            async with anyio.create_task_group() as tg:
                tg.start_soon(one.flush)
                tg.start_soon(two.flush)
        stats = [one.statistics(), two.statistics()]
    assert [s["committed"] for s in stats] == [10_000, 10_000]
    assert [s["retries"] for s in stats] == [0, 0]


async def test_corrupted_row_is_an_error_not_a_miss(pg_url: str, table: str) -> None:
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        await evaluate(
            qa_prompt(), echo_examples(1), model=echo_model(), metric=ExactMatch(), cache=cache
        )
    await _sql(pg_url, f"UPDATE \"{table}\" SET value = 'not json' WHERE key LIKE 'p:%'")
    model = echo_model()
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        with pytest.raises(CacheError, match="not valid JSON"):
            await evaluate(
                qa_prompt(),
                echo_examples(1),
                model=model,
                metric=ExactMatch(),
                cache=cache,
                on_error="raise",
            )
    assert model.calls == 0


async def test_a_store_of_another_format_is_refused(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table):
        pass
    await _sql(pg_url, f"UPDATE \"{table}_meta\" SET value = 'other-cache/9' WHERE key = 'format'")
    with pytest.raises(CacheError, match="other-cache/9"):
        await PostgresStore(pg_url, table=table).open()


async def test_tables_that_are_not_a_cache_are_refused(pg_url: str, table: str) -> None:
    """Someone else's table of that name, or rows without a marker, are never used."""
    await _sql(pg_url, f'CREATE TABLE "{table}" (id int PRIMARY KEY, name text)')
    with pytest.raises(CacheError, match="not a cache table"):
        await PostgresStore(pg_url, table=table).open()
    await _sql(pg_url, f'DROP TABLE "{table}"')
    await _sql(pg_url, f'CREATE TABLE "{table}" (key text PRIMARY KEY, value text NOT NULL)')
    await _sql(pg_url, f"INSERT INTO \"{table}\" VALUES ('p:x', '{{}}')")
    with pytest.raises(CacheError, match="no format marker"):
        await PostgresStore(pg_url, table=table).open()
    # the refused open rolled back: it created none of its tables
    assert await _sql(pg_url, "SELECT to_regclass($1)", f"{table}_meta") == [(None,)]


async def test_created_tables_are_not_readable_by_public(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table):
        pass
    for name in (table, f"{table}_meta", f"{table}_claims"):
        rows = await _sql(
            pg_url,
            "SELECT count(*) FROM information_schema.role_table_grants"
            " WHERE table_name = $1 AND grantee = 'PUBLIC'",
            name,
        )
        assert rows[0][0] == 0


async def test_a_failed_write_raises_instead_of_losing_rows(pg_url: str, table: str) -> None:
    """If the writer cannot commit, put/flush/aclose raise CacheError: never a silent miss."""
    store = await PostgresStore(pg_url, table=table).open()
    await _sql(pg_url, f'DROP TABLE "{table}"')
    await store.put("k", "{}")
    with pytest.raises(CacheError, match="writing"):
        await store.flush()
    with pytest.raises(CacheError, match="writing"):
        await store.put("k2", "{}")
    with pytest.raises(CacheError, match="writing"):
        await store.aclose()


async def test_one_refused_row_costs_only_itself(pg_url: str, table: str) -> None:
    """A CHECK a DBA added refuses one row of a batch: the batch's other (paid) rows
    and its claim releases are committed, and put/flush/aclose name the refused row
    (before, the whole batch was lost and the writer stopped)."""
    store = await PostgresStore(pg_url, table=table, flush_interval=30).open()
    await _sql(pg_url, f"ALTER TABLE \"{table}\" ADD CHECK (value NOT LIKE '%poison%')")
    assert await store.claim("k1", "me", ttl=60)
    for key, value in (("k1", '"a"'), ("bad", '"poison"'), ("k2", '"b"')):
        await store.put(key, value)
    await store.release("k1", "me")
    with pytest.raises(CacheError, match=r"1 rows could not be written.*'bad' \(CheckViolation"):
        await store.flush()
    rows = await _sql(pg_url, f'SELECT key, value FROM "{table}" ORDER BY key')
    assert [tuple(r) for r in rows] == [("k1", '"a"'), ("k2", '"b"')]
    assert await _sql(pg_url, f'SELECT key FROM "{table}_claims"') == []
    with pytest.raises(CacheError, match="'bad'"):
        await store.put("k3", '"c"')
    with pytest.raises(CacheError, match="'bad'"):
        await store.aclose()


async def test_the_store_survives_its_connections_being_killed(pg_url: str, table: str) -> None:
    """A server restart or an idle-connection reaper: reads and writes reconnect."""
    async with (
        PostgresStore(pg_url, table=table) as store,
        PostgresStore(pg_url, table=table, poll_interval=0.2) as other,
    ):
        await store.put("a", '"1"')
        await store.flush()
        assert await other.claim("held", "o", ttl=30)
        waiting = []

        async def wait() -> None:
            waiting.append(await store.wait_for("held", timeout=20))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.2)
            killed = await _sql(
                pg_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = $1",
                f"textgrad-engine {table}",
            )
            assert len(killed) >= 3  # the pools of both stores and the LISTEN connection
            assert await store.get("a") == '"1"'
            await store.put("b", '"2"')
            await store.flush()
            await other.put("held", '"v"')
            await other.release("held", "o")
        assert waiting == ['"v"']  # found by polling after its LISTEN connection died


async def test_a_read_cut_by_a_lost_connection_is_sent_again(pg_url: str, table: str) -> None:
    """The backend dies under an in-flight read: the read is retried, not failed."""
    async with PostgresStore(pg_url, table=table) as store:
        await store.put("a", '"1"')
        await store.flush()
        blocker = await asyncpg.connect(pg_url)
        try:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute(f'LOCK TABLE "{table}" IN ACCESS EXCLUSIVE MODE')
            got = []

            async def read() -> None:
                got.append(await store.get("a"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.sleep(0.3)  # the read now waits for the lock, in the server
                await blocker.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = $1",
                    f"textgrad-engine {table}",
                )
                await anyio.sleep(0.3)
                await lock.commit()
        finally:
            await blocker.close()
        assert got == ['"1"'] and store.statistics()["retries"] >= 1


async def test_unreachable_server_and_bad_settings(pg_url: str) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://engine:s3cret-pw@127.0.0.1:{port}/postgres"
    store = PostgresStore(url, connect_timeout=5)
    assert "s3cret-pw" not in repr(store)
    with pytest.raises(CacheError, match="cannot connect") as caught:
        await store.open()
    assert "s3cret-pw" not in str(caught.value)
    with pytest.raises(CacheError, match="not open"):
        await store.get("k")
    for bad in ("mysql://h/db", "postgresql://h:port/db"):
        with pytest.raises(ConfigError, match="bad PostgreSQL URL"):
            PostgresStore(bad)
    with pytest.raises(ConfigError, match="identifier"):
        PostgresStore(pg_url, table="x; DROP TABLE y")


def test_redaction_hides_url_passwords() -> None:
    text = "cannot connect to postgresql://engine:hunter2-pw@db.internal:5432/cache"
    assert "hunter2-pw" not in redact_text(text)
    assert "postgresql://engine:" in redact_text(text)


def test_importing_the_engine_never_imports_asyncpg() -> None:
    """asyncpg is an optional extra: `import engine` works without it, open() says why."""
    code = textwrap.dedent(
        """
        import sys, anyio
        import engine
        assert "asyncpg" not in sys.modules, "import engine pulled in asyncpg"
        sys.modules["asyncpg"] = None  # as if the extra were not installed
        try:
            anyio.run(engine.PostgresStore("postgresql://u@127.0.0.1:1/db").open)
        except engine.ConfigError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert "pip install 'textgrad-engine[postgres]'" in out.stdout


# -- single flight across processes ---------------------------------------------------


async def single_flight(
    store: PostgresStore, key: str, compute: Callable[[], Awaitable[str]], ttl: float = 30
) -> tuple[str, bool]:
    """The protocol of the module docstring: ``(value, computed_here)``."""
    value = await store.get(key)
    while value is None:
        owner = store.new_owner()
        if await store.claim(key, owner, ttl=ttl):
            try:
                value = await compute()
                await store.put(key, value)
            finally:
                await store.release(key, owner)
            return value, True
        value = await store.wait_for(key, timeout=30)
    return value, False


async def test_two_stores_claim_a_key_once_and_the_loser_gets_the_value(
    pg_url: str, table: str
) -> None:
    """Two connections race for one key: exactly one computes, the other waits for it."""
    paid: list[str] = []
    results: dict[str, tuple[str, bool]] = {}

    async def worker(name: str, store: PostgresStore) -> None:
        async def compute() -> str:
            paid.append(name)
            await anyio.sleep(0.3)  # the call that must not be paid twice
            return json.dumps({"text": f"answer by {name}"})

        results[name] = await single_flight(store, "p:shared", compute)

    async with PostgresStore(pg_url, table=table) as one, PostgresStore(pg_url, table=table) as two:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, "one", one)
            tg.start_soon(worker, "two", two)
        won = one.statistics()["claims_won"] + two.statistics()["claims_won"]
    assert len(paid) == 1 and won == 1
    assert results["one"][0] == results["two"][0] == json.dumps({"text": f"answer by {paid[0]}"})
    assert sorted(computed for _, computed in results.values()) == [False, True]


_WORKER = textwrap.dedent(
    """
    import json, sys, anyio
    sys.path.insert(0, {root!r})
    from engine import PostgresStore
    from tests.test_postgres import single_flight

    async def main():
        computed = []
        async with PostgresStore({url!r}, table={table!r}, flush_interval=0.05) as store:
            print("ready", flush=True)
            sys.stdin.readline()  # both processes start the race together

            async def one(key):
                async def compute():
                    computed.append(key)
                    await anyio.sleep(0.05)
                    return json.dumps({{"by": {name!r}, "key": key}})
                value, _ = await single_flight(store, key, compute)
                values[key] = value

            values = {{}}
            async with anyio.create_task_group() as tg:
                for i in range(40):
                    tg.start_soon(one, f"p:{{i}}")
        print(json.dumps({{"computed": computed, "values": values}}))

    anyio.run(main)
    """
)


def test_two_processes_pay_for_each_key_once(pg_url: str) -> None:
    """Two worker processes share 40 keys: every key is computed by exactly one of them."""
    table = "t_" + uuid.uuid4().hex[:12]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER.format(root=str(ROOT), url=pg_url, table=table, name=n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("a", "b")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        anyio.run(drop_tables, pg_url, table)
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    a, b = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    keys = {f"p:{i}" for i in range(40)}
    assert set(a["computed"]).isdisjoint(b["computed"])
    assert set(a["computed"]) | set(b["computed"]) == keys
    assert a["values"] == b["values"] and set(a["values"]) == keys


async def test_claims_expire_renew_and_release(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table) as store:
        assert await store.claim("k", "a", ttl=0.5)
        assert not await store.claim("k", "b", ttl=30)
        assert await store.claim("k", "a", ttl=0.5)  # the holder renews its own claim
        await anyio.sleep(0.7)
        assert await store.claim("k", "b", ttl=30)  # a's claim expired: taken over
        await store.release("k", "a")  # a stale holder's release drops nothing
        await store.flush()
        assert not await store.claim("k", "c", ttl=30)
        await store.put("k", '"v"')
        await store.release("k", "b")
        await store.flush()
        assert not await store.claim("k", "c", ttl=30)  # stored: nothing to compute
        assert await store.wait_for("k", timeout=1) == '"v"'
        assert await store.wait_for("free", timeout=30) is None  # nobody holds it


async def test_waiter_is_woken_when_the_holder_gives_up(pg_url: str, table: str) -> None:
    """A release without a value reaches a waiter in another store by NOTIFY, not by poll."""
    async with (
        PostgresStore(pg_url, table=table) as holder,
        PostgresStore(pg_url, table=table, poll_interval=60) as waiter,
    ):
        assert await holder.claim("k", "h", ttl=60)
        result: list[str | None] = []

        async def wait() -> None:
            started = time.monotonic()
            result.append(await waiter.wait_for("k", timeout=50))
            result.append(f"{time.monotonic() - started:.1f}")

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.2)
            await holder.release("k", "h")  # the computation failed: no value
    assert result[0] is None
    assert float(result[1]) < 30  # woken by the notification, not after the 60 s poll


# -- cache copy -----------------------------------------------------------------------


async def test_copy_round_trip_sqlite_postgres_sqlite(
    pg_url: str, table: str, tmp_path: Path
) -> None:
    await _fill_sqlite(tmp_path / "a.sqlite", 30)
    to_pg = await copy_cache(str(tmp_path / "a.sqlite"), pg_url, dst_table=table, batch_size=7)
    back = await copy_cache(pg_url, str(tmp_path / "b.sqlite"), src_table=table, batch_size=11)
    assert to_pg == back == 90
    assert _sqlite_rows(tmp_path / "b.sqlite") == _sqlite_rows(tmp_path / "a.sqlite")
    model = echo_model()  # the copied cache answers everything
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        again = await evaluate(
            qa_prompt(), echo_examples(30), model=model, metric=ExactMatch(), cache=cache
        )
    assert model.calls == 0 and again.cache_hits == 30


async def test_copy_refuses_other_formats_and_bad_input(
    pg_url: str, table: str, tmp_path: Path
) -> None:
    await _fill_sqlite(tmp_path / "a.sqlite", 3)
    async with PostgresStore(pg_url, table=table):
        pass
    await _sql(pg_url, f"UPDATE \"{table}_meta\" SET value = 'other-cache/9' WHERE key = 'format'")
    with pytest.raises(CacheError, match="other-cache/9"):
        await copy_cache(str(tmp_path / "a.sqlite"), pg_url, dst_table=table)
    assert await _sql(pg_url, f'SELECT 1 FROM "{table}"') == []
    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CacheError, match="not a cache"):
        await copy_cache(str(other), str(tmp_path / "c.sqlite"))
    with pytest.raises(ConfigError, match="no such file"):
        await copy_cache(str(tmp_path / "missing.sqlite"), pg_url, dst_table=table)
    with pytest.raises(ConfigError, match="no cache there"):
        await copy_cache(pg_url, str(tmp_path / "d.sqlite"), src_table=table + "_absent")
    with pytest.raises(ConfigError, match="same cache"):
        await copy_cache(str(tmp_path / "a.sqlite"), str(tmp_path / "." / "a.sqlite"))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", "cache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_cli_copy_round_trip_and_exit_codes(pg_url: str, tmp_path: Path) -> None:
    """`python -m engine cache copy` in a subprocess: JSON summary, exit 0 / 1 / 2."""
    table = "t_" + uuid.uuid4().hex[:12]
    anyio.run(_fill_sqlite, tmp_path / "a.sqlite", 10)
    try:
        up = _cli("copy", str(tmp_path / "a.sqlite"), pg_url, "--dst-table", table)
        down = _cli("copy", pg_url, str(tmp_path / "b.sqlite"), "--src-table", table)
        assert up.returncode == 0 and down.returncode == 0, up.stderr + down.stderr
        assert json.loads(up.stdout)["rows"] == json.loads(down.stdout)["rows"] == 30
        assert json.loads(up.stdout)["dst_table"] == json.loads(down.stdout)["src_table"] == table
        assert _sqlite_rows(tmp_path / "b.sqlite") == _sqlite_rows(tmp_path / "a.sqlite")
        assert stat.S_IMODE(os.stat(tmp_path / "b.sqlite").st_mode) == 0o600
        bad_format = tmp_path / "notes.sqlite"
        sqlite3.connect(bad_format).execute("CREATE TABLE notes (x)").connection.commit()
        failed = _cli("copy", str(bad_format), str(tmp_path / "c.sqlite"))
        assert failed.returncode == 1 and "not a cache" in failed.stderr
    finally:
        anyio.run(drop_tables, pg_url, table)
    for args in (
        ("copy", str(tmp_path / "missing.sqlite"), pg_url),
        ("copy", str(tmp_path / "a.sqlite"), "mysql://somewhere/db"),
        ("copy", str(tmp_path / "a.sqlite"), "postgresql://h:port/db"),
        ("copy", str(tmp_path / "a.sqlite")),
    ):
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""


async def test_concurrent_reads_share_queries(pg_url: str, table: str) -> None:
    """Many gets at once come back right, in fewer queries than keys."""
    async with PostgresStore(pg_url, table=table) as store:
        for i in range(0, 200, 2):
            await store.put(f"k{i}", json.dumps(i))
        await store.flush()
        found: dict[str, str | None] = {}

        async def read(key: str) -> None:
            found[key] = await store.get(key)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(read, f"k{i}")
        stats = store.statistics()
    assert found == {f"k{i}": (json.dumps(i) if i % 2 == 0 else None) for i in range(200)}
    assert stats["keys_read"] == 200 and stats["read_queries"] < 50


async def test_a_cancelled_read_leaves_the_store_usable(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table) as store:
        await store.put("k", '"v"')
        await store.flush()
        with anyio.move_on_after(0) as scope:
            await store.get("k")
        assert scope.cancelled_caught
        assert await store.get("k") == '"v"'


async def test_a_failed_read_raises_instead_of_missing(pg_url: str, table: str) -> None:
    async with PostgresStore(pg_url, table=table) as store:
        await _sql(pg_url, f'DROP TABLE "{table}"')
        with pytest.raises(CacheError, match="UndefinedTable"):
            await store.get("k")
        with pytest.raises(CacheError, match="UndefinedTable"):
            await store.get_many(["k"])


# -- run files: [cache] url -----------------------------------------------------------


def _demo_run(tmp_path: Path, cache: str) -> Path:
    """The bundled demo run with its [cache] section replaced."""
    examples = ROOT / "examples"
    for name in ("prompt.json", "arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        shutil.copy(examples / name, tmp_path / name)
    text = (examples / "demo.toml").read_text()
    text = text.replace('path = "../out/demo/cache.sqlite"', cache).replace(
        '"../out/demo"', '"out"'
    )
    assert cache in text
    (tmp_path / "demo.toml").write_text(text)
    return tmp_path / "demo.toml"


def test_run_file_cache_url_shares_the_cache(pg_url: str, tmp_path: Path) -> None:
    """`evaluate` with [cache] url: a second process pays for nothing."""
    table = "t_" + uuid.uuid4().hex[:12]
    run = _demo_run(tmp_path, f'url = "{pg_url}"\ntable = "{table}"')
    try:
        first = _evaluate_cli(run)
        second = _evaluate_cli(run)
    finally:
        anyio.run(drop_tables, pg_url, table)
    assert first["calls"] == 40 and first["cache_hits"] == 0
    assert second["calls"] == 0 and second["cache_hits"] == 40
    assert second["score"] == first["score"]


def _evaluate_cli(run: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", str(run), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: some examples scored with errors
    return dict(json.loads(done.stdout))


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        ('url = "mysql://h/db"', "[cache] url must start with postgresql://"),
        ('url = "postgresql://h/db"\npath = "c.sqlite"', "exclude each other"),
        ('url = "postgresql://h/db"\ntable = "Bad Name"', "[cache]: cache table"),
    ],
)
def test_run_file_cache_url_is_checked_before_any_call(
    tmp_path: Path, cache: str, message: str
) -> None:
    run = _demo_run(tmp_path, cache)
    done = subprocess.run(
        [sys.executable, "-m", "engine", "evaluate", str(run), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


async def test_wait_for_commit_returns_from_put_once_another_client_sees_the_row(
    pg_url: str, table: str
) -> None:
    """wait_for_commit: a put returns after its row's commit (batched: puts of one
    interval share it), so a process killed right after has lost no answer."""
    async with PostgresStore(
        pg_url, table=table, flush_interval=0.2, wait_for_commit=True
    ) as store:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(store.put, f"k{i}", f'"{i}"')
        rows = await _sql(pg_url, f'SELECT count(*) FROM "{table}"')
        assert rows[0][0] == 20
        assert store.statistics()["pending"] == 0 and store.statistics()["batches"] <= 2
        await store.put("last", '"x"')
        # checked before anything else awaits: the writer commits as soon as it is free,
        # so a later look could not tell a put that waited from one that did not
        assert store.statistics()["pending"] == 0
        rows = await _sql(pg_url, f'SELECT value FROM "{table}" WHERE key = $1', "last")
        assert [row[0] for row in rows] == ['"x"']


async def test_text_postgres_cannot_hold_is_refused_by_put_and_escaped_by_the_cache(
    pg_url: str, table: str
) -> None:
    """Issue 18: a lone surrogate or a NUL in one row used to fail the writer's whole
    batch.  `put` refuses such a row at once; the cache escapes them and reads back."""
    from engine import Example, MetricResult

    stderr = b"exit \xff".decode("utf-8", "surrogateescape")
    data = [*echo_examples(20), Example({"question": "q"}, "q", id="id-\udcff\x00")]

    def metric(ex: Example, pred: str) -> MetricResult:
        return MetricResult(1.0, stderr)

    async with PostgresStore(pg_url, table=table) as store:
        for key, value in (("p:x", '"\udcff"'), ("p:\x00", "{}")):
            with pytest.raises(CacheError, match="cannot store the row"):
                await store.put(key, value)
        await evaluate(qa_prompt(), data, model=echo_model(), metric=metric, cache=Cache(store))
    model = echo_model()
    async with Cache(PostgresStore(pg_url, table=table)) as cache:
        again = await evaluate(
            qa_prompt(), data, model=model, metric=metric, cache=cache, keep_outcomes=True
        )
    assert model.calls == 0 and again.cache_hits == 21
    assert {o.result.feedback for o in again.outcomes if o.result} == {stderr}
