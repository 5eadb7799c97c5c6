"""Routes of the providers with their own wire dialect (Anthropic, Gemini).

The same `Route` an `OpenAIChat` is sent along (``adapters._route``): the full URL, the
headers of every request, a display form for messages, the cache identity and the
secrets to scrub.  Only what differs is given here: the default root, the path, the
authentication headers and the environment variable the key is read from.  The cache
identity names the dialect and the root URL, never a key or a header.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from engine import ConfigError

from ._route import Route, _strings, root_route

__all__ = ["Dialect", "native_route", "resolve_native_key"]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What tells one provider's route from another's."""

    kind: str  # the cache identity's prefix: "anthropic-messages", "gemini"
    default_base_url: str
    base_url_env: str  # where a root URL may come from when none is given
    api_key_env: str  # where the key comes from when none is given
    key_header: str  # the header that carries the key


def resolve_native_key(api_key: str | None, dialect: Dialect, base_url: str | None) -> str:
    """The key to send: given, else ``$<api_key_env>``; a custom root (a local or
    simulated server) may go without one."""
    key = api_key or os.environ.get(dialect.api_key_env)
    if key:
        return key
    if base_url is None:
        raise ConfigError(f"no API key: pass api_key or set {dialect.api_key_env}")
    return "no-key"


def native_route(
    dialect: Dialect,
    *,
    base_url: str | None,
    path: str,
    api_key: str | None,
    extra_headers: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> Route:
    """The route to ``{base_url}{path}``.  ``extra_headers`` are the dialect's own (a
    version header); ``headers`` and ``query`` the caller's (gateways), which override
    ours by name and are never part of the cache identity."""
    user_headers, user_query = _strings(headers, "headers"), _strings(query, "query")
    key = resolve_native_key(api_key, dialect, base_url)
    root = base_url or os.environ.get(dialect.base_url_env) or dialect.default_base_url
    auth = dict(extra_headers or {})
    if key != "no-key":
        auth[dialect.key_header] = key
    return root_route(
        root,
        path,
        kind=dialect.kind,
        key=key,
        auth=auth,
        user_headers=user_headers,
        user_query=user_query,
    )
