"""PostgreSQL details of `PostgresStore`: the driver, URLs, statements and tables.

asyncpg is imported here, lazily, so ``import engine`` never needs it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .._errors import CacheError, ConfigError
from ._stores import _FORMAT

__all__ = [
    "Statements",
    "asyncpg_module",
    "check_table",
    "check_url",
    "db_errors",
    "display_url",
    "is_retryable",
    "prepare_schema",
]

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,40}")  # leaves room for the _claims suffix
_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:password|sslpassword)=)[^&#]*")

# Expected columns of each table, by suffix of the table name.
_COLUMNS = {
    "": {"key": "text", "value": "text"},
    "_meta": {"key": "text", "value": "text"},
    "_claims": {"key": "text", "owner": "text", "expires_at": "timestamp with time zone"},
}


def asyncpg_module() -> Any:
    try:
        import asyncpg
    except ImportError as exc:
        raise ConfigError(
            "PostgresStore needs asyncpg: pip install 'textgrad-engine[postgres]'"
        ) from exc
    return asyncpg


def db_errors() -> tuple[type[BaseException], ...]:
    """What a query can raise: the server's errors, the driver's, the network's."""
    asyncpg = asyncpg_module()
    return (
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
        OSError,
        TimeoutError,
    )


def display_url(url: str) -> str:
    """``url`` without its password (``user:***@`` or ``?password=***``), for messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _QUERY_PASSWORD.sub(r"\1***", url.split("@")[-1])
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return _QUERY_PASSWORD.sub(r"\1***", urlunsplit(parts))


def check_url(url: str) -> str:
    """Raise `ConfigError` unless ``url`` is a usable ``postgresql://`` URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigError(f"bad PostgreSQL URL {display_url(url)!r}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"bad PostgreSQL URL {display_url(url)!r}: expected postgresql://USER@HOST:PORT/DB"
        )
    return url


def check_table(table: str) -> str:
    """Raise `ConfigError` unless ``table`` is a plain lowercase SQL identifier."""
    if not _IDENTIFIER.fullmatch(table):
        raise ConfigError(f"cache table {table!r} must be a lowercase SQL identifier (a-z, 0-9, _)")
    return table


def is_retryable(exc: BaseException) -> bool:
    """A lost connection, or a transaction the server rolled back (deadlock victim).

    A connection the server closed while it sat idle in the pool can surface as the
    driver's InternalClientError ("cannot switch to state ...") on its next use.
    """
    asyncpg = asyncpg_module()
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.PostgresConnectionError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.InternalClientError
        | asyncpg.TransactionRollbackError,
    )


# SQLSTATEs of one row's fault, not the connection's or the table's: a data exception
# (class 22), an integrity constraint (class 23: a CHECK a DBA added), an exception a
# trigger raised (P0001), a row past a limit (54000).
_ROW_SQLSTATES = ("22", "23", "P0001", "54000")


def is_row_error(exc: BaseException | None) -> bool:
    """Whether the server refused a statement for what one of its rows holds."""
    state = getattr(exc, "sqlstate", None)
    return isinstance(state, str) and state.startswith(_ROW_SQLSTATES)


class Statements:
    """The statements of one table family; names are validated identifiers."""

    def __init__(self, table: str) -> None:
        kv, meta, claims = f'"{table}"', f'"{table}_meta"', f'"{table}_claims"'
        self.table, self.meta, self.claims = table, meta, claims
        self.channel = f"{table}_released"
        self.get = f"SELECT value FROM {kv} WHERE key = $1"
        self.get_many = f"SELECT key, value FROM {kv} WHERE key = ANY($1::text[])"
        self.scan = f"SELECT key, value FROM {kv} WHERE key > $1 ORDER BY key LIMIT $2"
        self.value_or_claim = (
            f"SELECT (SELECT value FROM {kv} WHERE key = $1), EXISTS (SELECT 1 FROM {claims}"
            " WHERE key = $1 AND expires_at > now())"
        )
        # One statement, so one transaction: the rows, then the claims they answer,
        # then a notification per released key, all visible at the same commit.  Rows
        # go in key order: two processes upserting the same keys then lock them in
        # the same order and cannot deadlock.
        self.write = (
            f"WITH up AS (INSERT INTO {kv} AS t (key, value)"
            " SELECT * FROM unnest($1::text[], $2::text[]) AS r(key, value)"
            ' ORDER BY r.key COLLATE "C"'
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
            " WHERE t.value IS DISTINCT FROM EXCLUDED.value),"
            f" gone AS (DELETE FROM {claims} c"
            " USING unnest($3::text[], $4::text[]) AS r(key, owner)"
            " WHERE c.key = r.key AND c.owner = r.owner)"
            f" SELECT count(pg_notify('{self.channel}', k)) FROM unnest($3::text[]) AS k"
        )
        self.claim = (
            f"INSERT INTO {claims} AS c (key, owner, expires_at)"
            " SELECT $1, $2, now() + make_interval(secs => $3)"
            f" WHERE NOT EXISTS (SELECT 1 FROM {kv} WHERE key = $1)"
            " ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner,"
            " expires_at = EXCLUDED.expires_at"
            " WHERE c.expires_at <= now() OR c.owner = EXCLUDED.owner"
            " RETURNING true"
        )
        self.drop_claim = f"DELETE FROM {claims} WHERE key = $1 AND owner = $2"
        self.create = [
            f"CREATE TABLE {kv} (key text PRIMARY KEY, value text NOT NULL)",
            f"CREATE TABLE {meta} (key text PRIMARY KEY, value text NOT NULL)",
            f"CREATE TABLE {claims} (key text PRIMARY KEY, owner text NOT NULL,"
            " expires_at timestamptz NOT NULL)",
        ]


async def prepare_schema(conn: Any, sql: Statements, where: str, *, create: bool) -> None:
    """Create the tables if absent and check that they hold a cache of our format."""
    try:
        async with conn.transaction():
            # Two processes opening a new cache at once must not both create it.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", sql.table)
            columns = await conn.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
                [sql.table + suffix for suffix in _COLUMNS],
            )
            found: dict[str, dict[str, str]] = {}
            for table, column, kind in columns:
                found.setdefault(str(table), {})[str(column)] = str(kind)
            for suffix, statement in zip(_COLUMNS, sql.create, strict=True):
                name = sql.table + suffix
                if name not in found and not create:
                    raise ConfigError(f"{where}: no cache there (table {name} does not exist)")
                if name not in found:
                    await conn.execute(statement)
                    await conn.execute(f'REVOKE ALL ON "{name}" FROM PUBLIC')
                elif found[name] != _COLUMNS[suffix]:
                    raise CacheError(f"{where}: table {name} exists but is not a cache table")
            await _check_format(conn, sql, where, create=create)
            if create:
                await conn.execute(f"DELETE FROM {sql.claims} WHERE expires_at < now()")
    except db_errors() as exc:
        raise CacheError(f"{where}: cannot prepare the cache tables: {exc}") from exc


async def _check_format(conn: Any, sql: Statements, where: str, *, create: bool) -> None:
    marker = await conn.fetchval(f"SELECT value FROM {sql.meta} WHERE key = 'format'")
    if marker is None:
        if not create or await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{sql.table}")'):
            raise CacheError(f"{where} holds no format marker: not a cache of this engine")
        await conn.execute(f"INSERT INTO {sql.meta} VALUES ('format', $1)", _FORMAT)
    elif marker != _FORMAT:
        raise CacheError(f"{where} is a cache of format {marker!r}, expected {_FORMAT!r}")
