"""`copy_cache`: move a cache between SQLite files and PostgreSQL, row by row.

Rows stream in key order, a page at a time, through the destination store's own
batched writer (with its back-pressure), so neither side's cache is ever held in
memory.  The source must be a cache of this format; a destination of another
format is refused when it opens.  Rows already in the destination are kept, and a
key present on both sides takes the source's value.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from .._errors import CacheError, ConfigError
from ._pg_schema import check_url, display_url
from ._postgres import PostgresStore
from ._stores import _FORMAT, SQLiteStore

__all__ = ["copy_cache", "is_postgres_url"]

_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: str) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return location.startswith(_SCHEMES)


async def copy_cache(
    src: str,
    dst: str,
    *,
    src_table: str = "engine_cache",
    dst_table: str = "engine_cache",
    batch_size: int = 1000,
) -> int:
    """Copy every row of the cache at ``src`` into the cache at ``dst``.

    Each side is a SQLite path or a ``postgresql://`` URL (``*_table`` names the
    PostgreSQL table).  Returns the number of rows copied.  Raises `ConfigError` for
    bad input (a missing source, a malformed URL, the same cache on both sides) and
    `CacheError` when a side is not a cache of this format or a read or write fails.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, not {batch_size}")
    _check_location(src, "source")
    _check_location(dst, "destination")
    if _identity(src, src_table) == _identity(dst, dst_table):
        raise ConfigError(f"source and destination are the same cache: {_show(src)}")
    if not is_postgres_url(src) and not await anyio.Path(src).is_file():
        raise ConfigError(f"source {src!r}: no such file")
    sink: PostgresStore | SQLiteStore = (
        PostgresStore(dst, table=dst_table) if is_postgres_url(dst) else SQLiteStore(dst)
    )
    copied = 0
    async with _Source(src, src_table, batch_size) as pages, sink:
        async for page in pages:
            for key, value in page:
                await sink.put(key, value)
            copied += len(page)
    return copied


def _check_location(location: str, side: str) -> None:
    if is_postgres_url(location):
        check_url(location)
    elif "://" in location:
        raise ConfigError(
            f"{side} {_show(location)!r} is neither a SQLite path nor a postgresql:// URL"
        )
    elif not location:
        raise ConfigError(f"{side} is empty")


def _identity(location: str, table: str) -> tuple[str, ...]:
    if is_postgres_url(location):
        return ("pg", location, table)
    return ("sqlite", os.path.realpath(location))


def _show(location: str) -> str:
    return display_url(location) if is_postgres_url(location) else location


class _Source:
    """The source's rows as pages; an async context manager that closes what it opened."""

    def __init__(self, location: str, table: str, batch_size: int) -> None:
        self.location, self.table, self.batch_size = location, table, batch_size
        self._store: PostgresStore | None = None
        self._sqlite: sqlite3.Connection | None = None

    async def __aenter__(self) -> AsyncIterator[list[tuple[str, str]]]:
        if is_postgres_url(self.location):
            store = PostgresStore(self.location, table=self.table, create=False)
            self._store = await store.open()
            return store.scan(self.batch_size)
        self._sqlite = await anyio.to_thread.run_sync(_open_sqlite_source, Path(self.location))
        return self._sqlite_pages(self._sqlite)

    async def __aexit__(self, *exc_info: object) -> None:
        with anyio.CancelScope(shield=True):
            if self._store is not None:
                await self._store.aclose()
            if self._sqlite is not None:
                self._sqlite.close()

    async def _sqlite_pages(self, conn: sqlite3.Connection) -> AsyncIterator[list[tuple[str, str]]]:
        after = ""
        while True:
            page = await anyio.to_thread.run_sync(_sqlite_page, conn, after, self.batch_size)
            if not page:
                return
            yield page
            after = page[-1][0]


def _open_sqlite_source(path: Path) -> sqlite3.Connection:
    """Open a SQLite cache read-only, after the same checks `SQLiteStore` makes."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    try:
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if not {"meta", "kv"} <= tables:
            raise CacheError(f"{path} is not a cache of this engine (no meta/kv tables)")
        row = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        if row is None or row[0] != _FORMAT:
            found = None if row is None else row[0]
            raise CacheError(f"{path} is a cache of format {found!r}, expected {_FORMAT!r}")
        check = conn.execute("PRAGMA quick_check(1)").fetchone()
        if check is None or check[0] != "ok":
            raise CacheError(f"{path} failed SQLite's integrity check: {check}")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise CacheError(
            f"{path} is not a readable cache database (corrupted or truncated?): {exc}"
        ) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _sqlite_page(conn: sqlite3.Connection, after: str, limit: int) -> list[tuple[str, str]]:
    try:
        rows = conn.execute(
            "SELECT key, value FROM kv WHERE key > ? ORDER BY key LIMIT ?", (after, limit)
        ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise CacheError(f"reading the source cache failed (corrupted?): {exc}") from exc
    return [(str(key), str(value)) for key, value in rows]
