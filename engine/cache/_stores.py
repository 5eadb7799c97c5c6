"""Cache stores: in-memory, and SQLite (the embedded default for anything on disk).

Both hold JSON text under string keys.  `SQLiteStore` writes through a single writer
thread (WAL mode), so the event loop never waits on a disk sync.  The writer commits
whenever its queue runs dry, and at least every ``flush_interval`` seconds of a busy
stream: a crash (``kill -9``) loses the calls in flight and at most the rows queued
behind one commit, not a whole interval.
Reads are point lookups on the loop thread: a primary-key read of a local WAL file
takes microseconds, less than a hop to a worker thread would.
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Self, cast

import anyio

from .._closeable import AsyncCloseable
from .._errors import CacheError

__all__ = ["MemoryStore", "SQLiteStore"]

_FORMAT = "textgrad-engine-cache/1"
_STOP = object()


class MemoryStore:
    """A dict in memory; lives as long as the object."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self._data.get(key)

    async def put(self, key: str, value: str) -> None:
        self._data[key] = value

    async def aclose(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"<MemoryStore entries={len(self._data)}>"


class SQLiteStore(AsyncCloseable):
    """A SQLite file of JSON values, written in batches off the event loop.

    Open it with ``async with SQLiteStore(path) as store`` (or ``await store.open()``
    and ``await store.aclose()``).  The file is created owner-only (0600): it holds
    prompts, inputs and predictions.  A file that is not a cache of this format, or is
    corrupted, raises `CacheError` on open instead of being used.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.2,
        max_pending: int = 20_000,
    ) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.max_pending = max_pending  # uncommitted rows before put() waits for the writer
        self._read: sqlite3.Connection | None = None  # loop-thread connection for reads
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # writes for the writer
        self._lock = threading.Lock()  # guards _pending
        self._pending: dict[str, str] = {}  # written but not yet committed: read-your-writes
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None  # first failure of the writer
        self._committed = 0  # rows committed so far

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> Self:
        await anyio.to_thread.run_sync(self._open_sync)
        return self

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            write = self._connect()
            write.execute("PRAGMA journal_mode=WAL")
            write.execute("PRAGMA synchronous=NORMAL")
            write.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            write.execute(
                "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
                " WITHOUT ROWID"
            )
            row = write.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if row is None:
                has_rows = write.execute("SELECT 1 FROM kv LIMIT 1").fetchone()
                if has_rows:
                    raise CacheError(f"{self.path} holds cache rows but no format marker")
                write.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
            elif row[0] != _FORMAT:
                raise CacheError(
                    f"{self.path} is a cache of format {row[0]!r}, expected {_FORMAT!r}"
                )
            check = write.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                raise CacheError(f"{self.path} failed SQLite's integrity check: {check}")
            write.commit()
            self._read = self._connect()
        except sqlite3.DatabaseError as exc:
            raise CacheError(
                f"{self.path} is not a readable cache database (corrupted or truncated?): {exc}"
            ) from exc
        self._writer = threading.Thread(
            target=self._writer_loop,
            args=(write,),
            name=f"sqlite-writer:{self.path.name}",
            daemon=True,
        )
        self._writer.start()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, check_same_thread=False)

    async def aclose(self) -> None:
        """Commit everything written so far and close the file."""
        writer = self._writer
        if writer is not None:
            self._queue.put(_STOP)
            await anyio.to_thread.run_sync(writer.join)
            self._writer = None
        if self._read is not None:
            self._read.close()
            self._read = None
        if self._writer_error is not None:
            raise CacheError(
                f"writing {self.path} failed: {self._writer_error}"
            ) from self._writer_error

    # -- the writer thread ------------------------------------------------------------
    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._commit(conn, batch)
                if stop:
                    return
        except BaseException as exc:  # reported to the loop on the next put/aclose
            self._writer_error = exc
        finally:
            conn.close()

    def _next_batch(self) -> tuple[dict[str, str], bool]:
        """Rows to commit now: whatever is queued when the queue runs dry (so a quiet
        run commits each row as it comes and a crash loses almost nothing), at most
        ``flush_interval`` of a busy stream, at most 5000 rows.  Also says whether to
        stop after committing them."""
        batch: dict[str, str] = {}
        item = self._queue.get()
        deadline = time.monotonic() + self.flush_interval
        while item is not _STOP:
            key, value = cast(tuple[str, str], item)
            batch[key] = value
            if len(batch) >= 5000 or time.monotonic() >= deadline:
                return batch, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, False
        return batch, True

    def _commit(self, conn: sqlite3.Connection, batch: dict[str, str]) -> None:
        with conn:
            conn.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", batch.items())
        self._committed += len(batch)
        with self._lock:
            for key, value in batch.items():
                if self._pending.get(key) is value:
                    del self._pending[key]

    # -- the store protocol -----------------------------------------------------------
    async def get(self, key: str) -> str | None:
        with self._lock:
            value = self._pending.get(key)
        if value is not None:
            return value
        if self._read is None:
            raise CacheError(f"{self.path} is not open; use 'async with SQLiteStore(...)'")
        try:
            row = self._read.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise CacheError(f"reading {self.path} failed (corrupted?): {exc}") from exc
        return None if row is None else str(row[0])

    async def put(self, key: str, value: str) -> None:
        if self._writer_error is not None:
            raise CacheError(
                f"writing {self.path} failed: {self._writer_error}"
            ) from self._writer_error
        if self._writer is None:
            raise CacheError(f"{self.path} is not open; use 'async with SQLiteStore(...)'")
        with self._lock:
            self._pending[key] = value
            backlog = len(self._pending)
        self._queue.put((key, value))
        if backlog >= self.max_pending:
            # The writer thread is behind (it shares the GIL with a busy loop): wait for
            # it to drain half the backlog, so memory stays bounded on huge runs.
            while self.statistics()["pending"] > self.max_pending // 2:
                if self._writer_error is not None or self._writer is None:
                    break
                await anyio.sleep(self.flush_interval / 4)

    def statistics(self) -> dict[str, int]:
        with self._lock:
            pending = len(self._pending)
        return {"committed": self._committed, "pending": pending}

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} committed={self._committed}>"
