"""`PostgresStore`: the cache store many processes and machines share, on PostgreSQL.

The same keys and JSON text rows as `SQLiteStore`, in three tables (``engine_cache``
unless ``table=`` says otherwise)::

    engine_cache         key text PRIMARY KEY, value text       the rows
    engine_cache_meta    key text PRIMARY KEY, value text       the format marker
    engine_cache_claims  key text PRIMARY KEY, owner text, expires_at timestamptz

Writes: `put` keeps the row in memory (reads see it at once) and a writer task
upserts everything queued in one statement per batch, committed at most
``flush_interval`` after the first row of the batch, so a crash loses at most that
interval (with ``wait_for_commit``, as in cluster workers, nothing: `put` returns
after the commit).  Once ``max_pending`` rows wait, `put` waits for the writer
(back-pressure).
A statement that lost its connection or was rolled back (a deadlock victim) is
retried twice on a fresh connection; after that a read raises `CacheError`, and a
failed batch makes every later `put` and `aclose` raise it: never a silent miss.

Reads: concurrent `get` calls share one query.  A reader task sends, in one
``key = ANY($1)`` lookup, every key asked for while its previous query was out, so
an evaluation's workers cost one round trip per batch of lookups, not one each.

Single flight across processes (the protocol; ``owner`` is unique per computation)::

    value = await store.get(key)
    while value is None:
        if await store.claim(key, owner, ttl=60):    # insert-if-absent, server clock
            try:
                value = await compute()              # the one paid call
                await store.put(key, value)
            finally:
                await store.release(key, owner)
            break
        value = await store.wait_for(key, timeout=60)   # None: the holder gave up

- `claim` wins when no value is stored and no other owner holds a live claim; a claim
  past its ``ttl`` (its holder died or hung) is taken over, and claiming again with
  the same owner renews it.  Exactly one of many concurrent claimants wins.
- `release` is committed by the writer in the same statement as every row put
  before it, and sends ``NOTIFY <table>_released, key`` on commit: whoever sees the
  claim gone also sees the value.
- `wait_for` returns the value once it is committed (woken by LISTEN, with a poll
  every ``poll_interval`` as a fallback), or ``None`` when the claim went away
  without a value (the holder failed, was cancelled, or died and its claim expired)
  or ``timeout`` passed: then claim again.  A waiter pays nothing and waits at most
  about ``flush_interval`` after the holder's `put`.

asyncpg (the optional extra ``postgres``) is imported when a store opens, never by
``import engine``; the store therefore needs anyio's asyncio backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterable
from typing import Any, Self

import anyio

from .._closeable import AsyncCloseable
from .._errors import CacheError, ConfigError
from ._json import unstorable
from ._pg_schema import (
    Statements,
    asyncpg_module,
    check_table,
    check_url,
    db_errors,
    display_url,
    is_retryable,
    is_row_error,
    prepare_schema,
)
from ._stores import refused_rows_error

__all__ = ["PostgresStore"]

_RETRIES = 3  # attempts per statement before a CacheError
_PAGE = 5000  # keys per get_many query


async def _keep_session(conn: Any) -> None:
    return None


def _settle(reads: dict[str, list[asyncio.Future[str | None]]], *, error: str) -> None:
    """Fail every get() still waiting in ``reads`` with a `CacheError`."""
    for futures in reads.values():
        for future in futures:
            if not future.done():
                future.set_exception(CacheError(error))


class PostgresStore(AsyncCloseable):
    """A PostgreSQL table of JSON values, shared by every process that opens it.

    Open it with ``async with PostgresStore(url) as store`` (or ``await store.open()``
    and ``await store.aclose()``).  A table that is not a cache of this format raises
    `CacheError` on open instead of being used; the tables it creates are revoked from
    PUBLIC (they hold prompts, inputs and predictions).

    ``flush_interval``: the longest a written row waits before its commit.
    ``wait_for_commit``: `put` returns only once its row is committed, so a process
    killed at any moment has lost only the calls it had in flight, never an answer it
    had.  The writer then commits as soon as it is free, without ``flush_interval``:
    the rows put during one commit go in the next (a group commit, so batches grow
    with the load and a put waits one or two commits).  ``None`` (the default):
    off in one process (a crash loses at most ``flush_interval`` of rows), on in the
    workers of an `engine.cluster.RayCluster`, whose killed worker must cost no more
    than its concurrency in repeated calls.
    ``max_pending``: uncommitted rows before `put` waits for the writer.
    ``table``: the rows' table (a lowercase identifier); two more are named after it.
    ``pool_size``: connections for reads, claims and the writer (one more for LISTEN).
    ``poll_interval``: how often `wait_for` looks again without a notification.
    ``create``: create the tables when absent; when false (reading a cache that must
    exist, e.g. the source of a copy) absent tables raise `ConfigError` and nothing
    is written on open.
    """

    def __init__(
        self,
        url: str,
        *,
        flush_interval: float = 0.2,
        wait_for_commit: bool | None = None,
        max_pending: int = 20_000,
        table: str = "engine_cache",
        pool_size: int = 4,
        poll_interval: float = 0.5,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
        create: bool = True,
    ) -> None:
        if flush_interval <= 0 or max_pending < 2 or pool_size < 1 or poll_interval <= 0:
            raise ConfigError(
                "flush_interval and poll_interval must be > 0, max_pending >= 2, pool_size >= 1"
            )
        self.url = check_url(url)
        self.table = check_table(table)
        self.flush_interval = flush_interval
        self.wait_for_commit = wait_for_commit
        self.max_pending = max_pending
        self.pool_size = pool_size
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.create = create
        self._sql = Statements(table)
        self._pool: Any = None  # asyncpg.Pool, once open
        self._listener: Any = None  # asyncpg.Connection that LISTENs, made on first wait_for
        self._pending: dict[str, str] = {}  # put but not yet committed: read-your-writes
        self._queue: dict[str, str] = {}  # put but not yet taken by the writer
        self._releases: dict[str, str] = {}  # claims to drop after the queued rows: key -> owner
        self._waiters: dict[str, set[asyncio.Event]] = {}  # wait_for calls by key
        self._new_signals()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reads: dict[str, list[asyncio.Future[str | None]]] = {}  # gets not yet sent
        self._writer_error: BaseException | None = None  # first failure of the writer
        self._failed_rows: dict[str, str] = {}  # rows the table refused -> why
        self._stopping = False
        self._taken = self._written = 0  # batches taken by / committed by the writer
        self._committed = self._claims_won = self._claims_lost = 0
        self._read_queries = self._keys_read = 0  # the reader's queries and keys they held
        self._retries = 0  # statements sent again after a lost connection or a rollback

    def _new_signals(self) -> None:
        self._work = asyncio.Event()  # the writer has something to do
        self._urgent = asyncio.Event()  # ... and should not wait for flush_interval
        self._progress = asyncio.Event()  # replaced after every batch; wakes flush/put
        self._read_work = asyncio.Event()  # the reader has keys to look up
        self._listen_lock = asyncio.Lock()  # one LISTEN connection, however many waiters

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> Self:
        """Connect, create the tables if absent, and check the format marker."""
        if self._pool is not None:
            return self  # already open (a store handed to `Cache` and opened twice)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError(
                "PostgresStore runs on asyncio (asyncpg): use anyio's asyncio backend"
            ) from None
        asyncpg = asyncpg_module()
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                # who holds these connections, in pg_stat_activity
                server_settings={"application_name": f"textgrad-engine {self.table}"},
                # The store changes no session state (no SET, LISTEN or session locks),
                # so skip asyncpg's reset query: it doubled the round trips of a read.
                reset=_keep_session,
            )
        except db_errors() as exc:
            raise CacheError(f"cannot connect to {display_url(self.url)}: {exc}") from exc
        try:
            async with self._pool.acquire() as conn:
                await prepare_schema(conn, self._sql, self._where(), create=self.create)
        except BaseException:
            await self._pool.close()
            self._pool = None
            raise
        self._stopping = False  # open again after aclose: the queues were drained
        self._new_signals()  # asyncio primitives bind to the loop that first waits on them
        self._writer = asyncio.create_task(self._writer_loop(), name=f"pg-writer:{self.table}")
        self._reader = asyncio.create_task(self._reader_loop(), name=f"pg-reader:{self.table}")
        return self

    async def aclose(self) -> None:
        """Commit everything written so far (and every release), then disconnect."""
        writer, self._writer = self._writer, None
        reader, self._reader = self._reader, None
        self._stopping = True
        self._work.set()
        self._urgent.set()
        self._read_work.set()
        tasks = [task for task in (writer, reader) if task is not None]
        if tasks:
            await asyncio.wait(tasks)
        if self._listener is not None:
            listener, self._listener = self._listener, None
            with contextlib.suppress(*db_errors()):
                await listener.close(timeout=self.command_timeout)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(*db_errors()):
                await pool.close()
        self._raise_writer_error()

    # -- the store protocol -----------------------------------------------------------
    async def get(self, key: str) -> str | None:
        value = self._pending.get(key)
        if value is not None:
            return value
        if self._reader is None or self._reader.done():
            raise CacheError(f"{self!r} is not open; use 'async with PostgresStore(...)'")
        # Concurrent reads share one query: the reader task sends every key asked for
        # while its previous query was out (evaluate's workers ask dozens at a time).
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._reads.setdefault(key, []).append(future)
        self._read_work.set()
        return await future

    async def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The stored values of ``keys`` (absent keys are left out), in few queries."""
        found: dict[str, str] = {}
        missing: list[str] = []
        for key in keys:
            value = self._pending.get(key)
            if value is not None:
                found[key] = value
            else:
                missing.append(key)
        for start in range(0, len(missing), _PAGE):
            rows = await self._query("fetch", self._sql.get_many, missing[start : start + _PAGE])
            found.update((str(k), str(v)) for k, v in rows)
        return found

    async def put(self, key: str, value: str) -> None:
        self._check_writable()
        for part, text in (("key", key), ("value", value)):
            why = unstorable(text)
            if why is not None:  # refused here: in the writer it would fail a whole batch
                raise CacheError(
                    f"cannot store the row {key!r} in {self._where()}: its {part} {why}"
                )
        self._pending[key] = value
        self._queue[key] = value
        self._work.set()
        if self._waiters:
            self._wake_waiters(key)  # a wait_for in this process
        if self.wait_for_commit:
            # The row is in the queue, so the writer's next batch holds it (it takes the
            # queue and counts the batch without awaiting in between).
            target = self._taken + 1
            while self._written < target and self._writer_alive():
                await self._progress.wait()
            self._raise_writer_error()
            return
        if len(self._pending) >= self.max_pending:
            # The writer is behind: wait until it has drained half the backlog, so
            # memory stays bounded on huge runs.
            self._urgent.set()
            while len(self._pending) > self.max_pending // 2 and self._writer_alive():
                await self._progress.wait()
            self._raise_writer_error()

    async def flush(self) -> None:
        """Wait until every row put and claim released so far is committed."""
        self._check_writable()
        target = self._taken + 1 if (self._queue or self._releases) else self._taken
        self._urgent.set()
        self._work.set()
        while self._written < target and self._writer_alive():
            await self._progress.wait()
        self._raise_writer_error()

    # -- single flight across processes -----------------------------------------------
    async def claim(self, key: str, owner: str, ttl: float) -> bool:
        """Try to become the one process that computes ``key`` (see the module docs).

        True when this owner now holds the claim for ``ttl`` seconds (server clock);
        False when the value is already stored or another owner's claim is live.
        """
        self._check_writable()
        if ttl <= 0:
            raise ConfigError(f"claim ttl must be > 0 seconds, not {ttl!r}")
        if key in self._pending:
            self._claims_lost += 1
            return False
        won = await self._query("fetchval", self._sql.claim, key, owner, float(ttl))
        if won and await self.get(key) is not None:
            # The holder before us committed its value and released just as we took
            # over its row; the value is there, so there is nothing to compute.
            await self._query("execute", self._sql.drop_claim, key, owner)
            won = False
        if won:
            self._claims_won += 1
        else:
            self._claims_lost += 1
        return bool(won)

    async def release(self, key: str, owner: str) -> None:
        """Give up ``owner``'s claim on ``key``, committed after every row put before.

        Call it when the computation ends, whether it stored a value or failed.
        """
        self._check_writable()
        self._releases[key] = owner
        self._work.set()

    # Not a cancel scope: running out of time is an answer here ("claim it yourself").
    async def wait_for(self, key: str, timeout: float) -> str | None:  # noqa: ASYNC109
        """The value of ``key`` once another owner commits it, or ``None``.

        ``None`` comes back as soon as no live claim is left without a value (the
        holder failed, was cancelled or died), or after ``timeout`` seconds: then
        `claim` again.  Never raises for a timeout; every wait is bounded by it.
        """
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            await self._listen()
            deadline = anyio.current_time() + timeout
            while True:
                event.clear()
                value = self._pending.get(key)
                if value is not None:
                    return value
                row = await self._query("fetchrow", self._sql.value_or_claim, key)
                if row[0] is not None:
                    return str(row[0])
                remaining = deadline - anyio.current_time()
                if not row[1] or remaining <= 0:
                    return None
                with anyio.move_on_after(min(remaining, self.poll_interval)):
                    await event.wait()
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    @staticmethod
    def new_owner() -> str:
        """A claim owner id unique to one computation: host, process and a random tag."""
        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(6)}"

    # -- reading everything -----------------------------------------------------------
    async def scan(self, batch_size: int = 1000) -> AsyncIterator[list[tuple[str, str]]]:
        """Every committed row, in key order, ``batch_size`` rows at a time.

        Pages by key (no transaction is held open), so memory stays at one batch.
        """
        after = ""
        while True:
            rows = await self._query("fetch", self._sql.scan, after, batch_size)
            if not rows:
                return
            batch = [(str(k), str(v)) for k, v in rows]
            yield batch
            after = batch[-1][0]

    def statistics(self) -> dict[str, int]:
        """Live counters: rows, batches, retries, read queries and keys, claims."""
        return {
            "committed": self._committed,
            "pending": len(self._pending),
            "batches": self._written,
            "retries": self._retries,
            "read_queries": self._read_queries,
            "keys_read": self._keys_read,
            "claims_won": self._claims_won,
            "claims_lost": self._claims_lost,
        }

    def __repr__(self) -> str:
        return (
            f"<PostgresStore {display_url(self.url)!r} table={self.table!r} "
            f"committed={self._committed}>"
        )

    # -- the writer task --------------------------------------------------------------
    async def _writer_loop(self) -> None:
        try:
            while True:
                await self._work.wait()
                if not self._urgent.is_set() and not self.wait_for_commit:
                    # (a put that waits for its commit is not kept waiting for the
                    # interval too: rows queued during one commit go in the next)
                    with anyio.move_on_after(self.flush_interval):
                        await self._urgent.wait()
                self._work.clear()
                self._urgent.clear()
                rows, self._queue = self._queue, {}
                releases, self._releases = self._releases, {}
                if rows or releases:
                    self._taken += 1
                    failed = await self._write(rows, releases)
                    self._failed_rows.update(failed)
                    self._written = self._taken
                    self._committed += len(rows) - len(failed)
                    for key, value in rows.items():
                        if self._pending.get(key) is value:
                            del self._pending[key]
                    self._wake_progress()
                if self._stopping and not self._queue and not self._releases:
                    return
        except BaseException as exc:  # reported on the next put/flush/aclose
            self._writer_error = exc
            self._wake_progress()
            if not isinstance(exc, Exception):
                raise

    async def _write(self, rows: dict[str, str], releases: dict[str, str]) -> dict[str, str]:
        """Commit ``rows`` and ``releases`` in one statement; the rows refused, and why.

        One row the table refuses (a CHECK or trigger a DBA added) must not cost the
        batch's other, paid rows: the batch is then written a row per statement and
        the refused ones are named (every later operation raises, as SQLite's does).
        """
        args = (list(rows), list(rows.values()), list(releases), list(releases.values()))
        try:
            await self._query("execute", self._sql.write, *args)
        except CacheError as exc:
            if not rows or not is_row_error(exc.__cause__):
                raise
        else:
            return {}
        failed: dict[str, str] = {}
        for key, value in rows.items():
            try:
                await self._query("execute", self._sql.write, [key], [value], [], [])
            except CacheError as exc:
                if not is_row_error(exc.__cause__):
                    raise
                failed[key] = f"{type(exc.__cause__).__name__}: {exc.__cause__}"
        if releases:
            await self._query("execute", self._sql.write, [], [], *args[2:])
        return failed

    async def _reader_loop(self) -> None:
        try:
            while self._reads or not self._stopping:
                if not self._reads:
                    await self._read_work.wait()
                    self._read_work.clear()
                    continue
                batch, self._reads = self._reads, {}
                self._read_queries += 1
                self._keys_read += len(batch)
                try:
                    rows = await self._query("fetch", self._sql.get_many, list(batch))
                except CacheError as exc:
                    _settle(batch, error=exc.message)
                    continue
                found = {str(k): str(v) for k, v in rows}
                for key, futures in batch.items():
                    value = found.get(key)
                    for future in futures:
                        if not future.done():  # a cancelled get() leaves its future done
                            future.set_result(value)
        finally:
            # However the reader ends, no get() is left waiting on it.
            batch, self._reads = self._reads, {}
            _settle(batch, error=f"{self._where()}: the store was closed during the read")

    def _wake_progress(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- helpers ----------------------------------------------------------------------
    async def _query(self, method: str, sql: str, *args: Any) -> Any:
        """Run one statement on a pooled connection; failures raise `CacheError`.

        Every statement the store sends may be sent twice (reads, upserts, a claim
        by the same owner, deletes), so one that lost its connection or that the
        server rolled back (a deadlock victim) is retried on a fresh connection.
        """
        for attempt in range(_RETRIES):
            if self._pool is None:
                raise CacheError(f"{self!r} is not open; use 'async with PostgresStore(...)'")
            try:
                return await getattr(self._pool, method)(sql, *args)
            except db_errors() as exc:
                if attempt == _RETRIES - 1 or not is_retryable(exc):
                    raise CacheError(f"{self._where()}: {type(exc).__name__}: {exc}") from exc
            self._retries += 1
            await anyio.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    async def _listen(self) -> None:
        """Start LISTENing for releases once; without it, `wait_for` polls."""
        async with self._listen_lock:
            if self._listener is not None and not self._listener.is_closed():
                return
            try:
                conn = await asyncpg_module().connect(
                    self.url,
                    timeout=self.connect_timeout,
                    server_settings={"application_name": f"textgrad-engine {self.table}"},
                )
            except db_errors():
                return  # polling every poll_interval still finds the value
            try:
                await conn.add_listener(self._sql.channel, self._on_release)
            except db_errors():
                conn.terminate()
                return
            self._listener = conn

    def _on_release(self, conn: Any, pid: int, channel: str, key: str) -> None:
        self._wake_waiters(key)  # a NOTIFY from whichever process released ``key``

    def _wake_waiters(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    def _check_writable(self) -> None:
        self._raise_writer_error()
        if self._writer is None:
            raise CacheError(f"{self!r} is not open; use 'async with PostgresStore(...)'")

    def _writer_alive(self) -> bool:
        return self._writer_error is None and self._writer is not None

    def _raise_writer_error(self) -> None:
        if self._writer_error is not None:
            error = self._writer_error
            detail = error if isinstance(error, CacheError) else f"{self._where()}: {error!r}"
            raise CacheError(f"writing the cache failed: {detail}") from error
        if self._failed_rows:
            raise refused_rows_error(self._failed_rows, self._where())

    def _where(self) -> str:
        return f"{display_url(self.url)} table {self.table}"
