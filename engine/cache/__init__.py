"""The cache: `Cache`, its stores (memory, SQLite, PostgreSQL), keys and copy."""

from ._cache import Cache, CachedPrediction, CacheStatistics, metric_identity, request_hash
from ._copy import copy_cache, is_postgres_url
from ._pg_schema import check_table, check_url, display_url
from ._postgres import PostgresStore
from ._stores import MemoryStore, SQLiteStore

__all__ = [
    "Cache",
    "CacheStatistics",
    "CachedPrediction",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "check_table",
    "check_url",
    "copy_cache",
    "display_url",
    "is_postgres_url",
    "metric_identity",
    "request_hash",
]
