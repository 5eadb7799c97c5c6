"""Cache stores: in-memory, and SQLite (the embedded default for anything on disk).

Both hold JSON text under string keys.  `SQLiteStore` writes through a single writer
thread (WAL mode), so the event loop never waits on a disk sync.  The writer commits
whenever its queue runs dry, and at least every ``flush_interval`` seconds of a busy
stream: a crash (``kill -9``) loses the calls in flight and at most the rows queued
behind one commit, not a whole interval.
Reads are point lookups on the loop thread, and only of keys that may be there: the
store keeps the 64-bit hash of every key in the file (read once at open, then of each
row it writes; up to `_MAX_FILTERED` keys, ~60 bytes each), so a lookup of an absent
key, as every lookup of a cold run is, answers from memory without a ``SELECT`` (10-25
us each: a read transaction on the WAL).  A hash found costs one ``SELECT`` (a
collision, about n / 2**64, is then a miss).  Rows another process commits are not in
that set: the writer thread asks SQLite (``PRAGMA data_version`` on its own connection,
which only other connections move) after each commit and every ``_POLL`` seconds when
idle, and from the first move on every lookup is a ``SELECT`` again.  So a row another
process committed is a hit once that check has run (within ``_POLL`` s), and before it
at worst a miss paid again, as a lookup made a moment earlier would have been; never
a wrong hit (the set only answers "absent").
"""

from __future__ import annotations

import errno
import os
import queue
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Self, cast

import anyio

from .._closeable import AsyncCloseable
from .._errors import CacheError
from ._json import unstorable

__all__ = ["MemoryStore", "SQLiteStore", "refused_rows_error"]

_FORMAT = "textgrad-engine-cache/1"
_STOP = object()
# How long a statement waits on another process's lock before SQLITE_BUSY.
_BUSY_TIMEOUT = 5.0
# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_READONLY = 11, 26, 8
_SQLITE_CANTOPEN, _SQLITE_IOERR = 14, 10
_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
# How often an idle writer thread looks for another process's commits.
_POLL = 0.05
# Past this many keys the hash set (~60 bytes a key in memory) is dropped and every
# lookup is a SELECT again: memory stays bounded on a huge file or run.
_MAX_FILTERED = 1_000_000
_UPSERT = "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)"
# Errors of one row (a constraint or trigger, text SQLite cannot take, a value too
# big), as opposed to errors of the file (locked, full, read-only: OperationalError).
_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, ValueError)


def refused_rows_error(failed: dict[str, str], where: str) -> CacheError:
    """The error every later operation of a store raises once rows were refused: how
    many, the first five by key with the reason."""
    rows = list(failed.items())
    named = "; ".join(f"{key!r} ({why})" for key, why in rows[:5])
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    return CacheError(f"{len(rows)} rows could not be written to {where}: {named}{more}")


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

    def rows(self) -> dict[str, str]:
        """The dict itself: `Cache` reads and writes it directly, without a coroutine
        per row (the store's get and put never wait)."""
        return self._data

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
        lock_timeout: float = 30.0,
    ) -> None:
        """``lock_timeout``: how long `open` waits while another process holds the
        file's lock (creating the same fresh file, say) before it raises."""
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.flush_interval = flush_interval
        self.max_pending = max_pending  # uncommitted rows before put() waits for the writer
        self._read: sqlite3.Connection | None = None  # loop-thread connection for reads
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # writes for the writer
        self._lock = threading.Lock()  # guards _pending
        self._pending: dict[str, str] = {}  # written but not yet committed: read-your-writes
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None  # first failure of the writer
        self._failed_rows: dict[str, str] = {}  # rows the writer could not write -> why
        self._committed = 0  # rows committed so far
        # hash() of every key in the file, while no other process writes to it (see the
        # module's docstring); None: every lookup reads the file
        self._known: set[int] | None = None
        self._foreign = False  # set by the writer thread: another connection committed

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> Self:
        await anyio.to_thread.run_sync(self._open_sync)
        return self

    def _open_sync(self) -> None:
        self._prepare_location()
        deadline = time.monotonic() + self.lock_timeout
        while True:
            write: sqlite3.Connection | None = None
            try:
                write = self._connect(timeout=min(1.0, self.lock_timeout))
                self._prepare_schema(write)
                write.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT * 1000)}")
                # the writer's baseline comes before the keys are read: a commit of
                # another process after it is seen as a change, never missed
                version = _data_version(write)
                self._foreign = False  # a reopened store starts from the file as it is
                self._read = self._connect()
                self._known = self._load_keys(self._read)
                break
            except sqlite3.DatabaseError as exc:
                if write is not None:
                    write.close()
                # Another process creating the same fresh file holds the lock for a
                # moment (4 opens in 30 used to fail): wait for it, within lock_timeout.
                if _primary_code(exc) in _BUSY_CODES and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._open_error(exc) from exc
            except BaseException:
                if write is not None:
                    write.close()
                raise
        self._writer = threading.Thread(
            target=self._writer_loop,
            args=(write, version),
            name=f"sqlite-writer:{self.path.name}",
            daemon=True,
        )
        self._writer.start()

    @staticmethod
    def _load_keys(read: sqlite3.Connection) -> set[int] | None:
        """The hash of every key in the file, or ``None`` when it holds too many."""
        known: set[int] = set()
        cursor = read.execute("SELECT key FROM kv")
        while rows := cursor.fetchmany(10_000):
            known.update(hash(key) for (key,) in rows)
            if len(known) > _MAX_FILTERED:
                cursor.close()
                return None
        return known

    def _prepare_location(self) -> None:
        """Make the folder and the owner-only file, saying which one cannot be written."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot create the folder {folder} for the cache {self.path}: {exc.strerror}"
            ) from exc
        if self.path.exists():
            # SQLite opens a read-only file read-only without a word; the loss would
            # show only at the first write
            unwritable = _unwritable(self.path)
            if unwritable is not None:
                raise CacheError(f"{unwritable}; a cache needs to write there")
            return
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        except FileExistsError:
            pass  # another process created it first
        except OSError as exc:
            raise CacheError(
                f"the folder {folder} is not writable: cannot create the cache {self.path} "
                f"({exc.strerror})"
            ) from exc

    def _prepare_schema(self, write: sqlite3.Connection) -> None:
        """WAL mode, the tables and the format marker, in one write transaction (two
        processes creating one fresh file cannot both insert the marker)."""
        write.execute("PRAGMA journal_mode=WAL")
        write.execute("PRAGMA synchronous=NORMAL")
        write.execute("BEGIN IMMEDIATE")
        write.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        write.execute(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            " WITHOUT ROWID"
        )
        row = write.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if row is None:
            if write.execute("SELECT 1 FROM kv LIMIT 1").fetchone():
                raise CacheError(f"{self.path} holds cache rows but no format marker")
            write.execute("INSERT INTO meta VALUES ('format', ?)", (_FORMAT,))
        elif row[0] != _FORMAT:
            raise CacheError(f"{self.path} is a cache of format {row[0]!r}, expected {_FORMAT!r}")
        check = write.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise CacheError(f"{self.path} failed SQLite's integrity check: {check}")
        write.commit()

    def _open_error(self, exc: sqlite3.DatabaseError) -> CacheError:
        """What is actually wrong, from SQLite's error code and a look at the disk."""
        code = _primary_code(exc)
        if code in _BUSY_CODES:
            return CacheError(
                f"{self.path} is locked by another process: still locked after "
                f"{self.lock_timeout:g} s ({exc})"
            )
        if code in (_SQLITE_READONLY, _SQLITE_CANTOPEN, _SQLITE_IOERR):
            unwritable = _unwritable(self.path)
            if unwritable is not None:
                return CacheError(f"{unwritable}; a cache needs to write there ({exc})")
        if code in (_SQLITE_NOTADB, _SQLITE_CORRUPT):
            return CacheError(
                f"{self.path} is not a readable cache database (corrupted or truncated?): {exc}"
            )
        return CacheError(f"opening the cache {self.path} failed: {exc}")

    def _connect(self, timeout: float = _BUSY_TIMEOUT) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=timeout, check_same_thread=False)

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
        self._raise_write_failure()

    # -- the writer thread ------------------------------------------------------------
    def _writer_loop(self, conn: sqlite3.Connection, version: int) -> None:
        try:
            while True:
                batch, stop = self._next_batch()
                if batch:
                    self._commit(conn, batch)
                if stop:
                    return
                if not self._foreign and _moved(conn, version):
                    self._foreign = True  # another connection committed: look rows up
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
        try:
            item = self._queue.get(timeout=None if self._foreign else _POLL)
        except queue.Empty:
            return batch, False  # idle: time to look for other processes' commits
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
        failed: dict[str, str] = {}
        try:
            with conn:
                conn.executemany(_UPSERT, batch.items())
        except _ROW_ERRORS:
            # One row the file refuses must not cost the batch's other (paid) rows:
            # write them one by one in one transaction and name the ones refused.
            failed = self._commit_rows(conn, batch)
        self._committed += len(batch) - len(failed)
        with self._lock:
            self._failed_rows.update(failed)
            for key, value in batch.items():
                if self._pending.get(key) is value:
                    del self._pending[key]

    @staticmethod
    def _commit_rows(conn: sqlite3.Connection, batch: dict[str, str]) -> dict[str, str]:
        """Write ``batch`` row by row in one transaction; the rows refused, and why."""
        failed: dict[str, str] = {}
        with conn:
            for key, value in batch.items():
                try:
                    conn.execute(_UPSERT, (key, value))
                except _ROW_ERRORS as exc:
                    failed[key] = f"{type(exc).__name__}: {exc}"
        return failed

    # -- the store protocol -----------------------------------------------------------
    async def get(self, key: str) -> str | None:
        self._raise_write_failure()
        known = self._known
        if known is not None:
            if self._foreign:
                self._known = None
            elif hash(key) not in known:
                return None  # never written here, nor in the file when it was opened
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
        self._raise_write_failure()
        for part, text in (("key", key), ("value", value)):
            why = unstorable(text)
            if why is not None:  # refused here, so the writer's batch is not at risk
                raise CacheError(f"cannot store the row {key!r} in {self.path}: its {part} {why}")
        if self._writer is None:
            raise CacheError(f"{self.path} is not open; use 'async with SQLiteStore(...)'")
        known = self._known
        if known is not None:
            known.add(hash(key))
            if len(known) > _MAX_FILTERED:
                self._known = None
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
            failed = len(self._failed_rows)
        return {"committed": self._committed, "pending": pending, "failed": failed}

    def _raise_write_failure(self) -> None:
        """Raise `CacheError` once the writer has failed or refused a row: every later
        operation says so, naming the rows, rather than the loss showing at close."""
        if self._writer_error is not None:
            raise CacheError(
                f"writing {self.path} failed: {self._writer_error}"
            ) from self._writer_error
        if self._failed_rows:
            with self._lock:
                failed = dict(self._failed_rows)
            raise refused_rows_error(failed, str(self.path))

    def __repr__(self) -> str:
        return f"<SQLiteStore {str(self.path)!r} committed={self._committed}>"


def _data_version(conn: sqlite3.Connection) -> int:
    """SQLite's count of other connections' commits as ``conn`` sees it (``conn``'s own
    commits leave it unchanged)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _moved(conn: sqlite3.Connection, version: int) -> bool:
    """Whether another connection committed since ``version`` (when SQLite cannot say,
    assume it did: the cost is a SELECT per lookup, never a missed row or a dead
    writer)."""
    try:
        return _data_version(conn) != version
    except sqlite3.Error:
        return True


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _unwritable(path: Path) -> str | None:
    """Which of the cache file and its folder cannot be written, by trying: SQLite
    keeps its -wal and -shm files beside the cache, so both must be writable."""
    try:
        os.close(os.open(path, os.O_WRONLY))
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"{path} is read-only ({exc.strerror})"
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        return f"the folder {path.parent} of the cache {path.name} is not writable ({exc.strerror})"
    return None
