"""Where an `OpenAIChat` sends its requests, how it authenticates, and who answers.

A `Route` is worked out once, when the adapter is made: the full chat-completions URL
(query included), the headers of every request, a display form of the URL for messages
(no userinfo, no query), and the cache identity.  Two shapes:

- OpenAI and compatible servers: ``{base_url}/chat/completions``,
  ``Authorization: Bearer KEY``.
- Azure OpenAI: ``{endpoint}/openai/deployments/{deployment}/chat/completions
  ?api-version=V``, ``api-key: KEY`` (or the caller's own ``Authorization`` header,
  e.g. an Entra ID token).

Gateways add their own ``headers=`` (which override ours, name by name, case-insensitive)
and ``query=`` parameters.  Neither is part of the cache identity: their values are
often secrets, and rotating a key must not empty the cache (set the engine's cache
namespace to tell two routes of one gateway apart).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from engine import ConfigError

from ._wire import resolve_api_key

__all__ = ["DEFAULT_BASE_URL", "Route", "azure_route", "openai_route", "root_route"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
_USER_AGENT = "textgrad-engine/0.1"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint's address and credentials (see the module docstring).

    ``headers`` and ``api_key`` hold secrets: `Route` never prints them.
    """

    url: str = field(repr=False)  # the chat-completions URL, query (maybe secret) included
    headers: Mapping[str, str] = field(repr=False)  # lower-case names
    display: str  # scheme://host[:port]/path: safe in messages
    identity: str  # cache identity: kind + display (+ Azure deployment and api-version)
    label: str  # short name for events: host[:port]/path
    # what the SDK transport needs to build the same request its own way
    base_url: str = field(default="", repr=False)
    api_key: str | None = field(default=None, repr=False)
    user_headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    user_query: Mapping[str, str] = field(default_factory=dict, repr=False)
    azure_endpoint: str | None = None
    azure_deployment: str | None = None
    api_version: str | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every value this route sends that may be a credential: the key, the caller's
        header and query values (a bearer token alone too), the base URL's query."""
        values = [self.api_key or "", *self.user_headers.values(), *self.user_query.values()]
        values += [value for _, value in parse_qsl(urlsplit(self.base_url).query)]
        values += [value.split(" ", 1)[1] for value in values if " " in value]
        # short values ("1", "eu") are settings, and replacing them would garble text
        return tuple(sorted({v for v in values if len(v) >= 8 and v != "no-key"}, key=len))


def _strings(value: Mapping[str, str] | None, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{what} must be a mapping of names to strings")
    for name, item in value.items():
        if not isinstance(name, str) or not isinstance(item, str):
            raise ConfigError(f"{what}: {name!r} must map a string to a string")
    return dict(value)


def _split(url: str, what: str) -> tuple[str, str, str]:
    """``(display, label, query)`` of a root URL; refuses credentials in it."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} must be an http(s) URL with a host")
    if parts.username or parts.password:
        # never echo the URL: the credentials are in it
        raise ConfigError(f"{what} must not carry credentials; use api_key or headers=")
    host = parts.hostname.lower()
    port = f":{parts.port}" if parts.port and parts.port != _DEFAULT_PORTS[parts.scheme] else ""
    path = parts.path.rstrip("/")
    return f"{parts.scheme}://{host}{port}{path}", f"{host}{port}{path}", parts.query


def _query(*parts: str) -> str:
    joined = "&".join(p for p in parts if p)
    return f"?{joined}" if joined else ""


def _headers(auth: Mapping[str, str], user: Mapping[str, str]) -> dict[str, str]:
    headers = {
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": _USER_AGENT,
        **auth,
    }
    headers.update({name.lower(): value for name, value in user.items()})
    return headers


def openai_route(
    *,
    base_url: str | None,
    api_key: str | None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> Route:
    """The route of an OpenAI-compatible endpoint (``base_url`` default: OpenAI's, or
    ``$OPENAI_BASE_URL`` as the SDK reads it)."""
    user_headers, user_query = _strings(headers, "headers"), _strings(query, "query")
    key = resolve_api_key(api_key, base_url)
    root = base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    return root_route(
        root,
        "/chat/completions",
        kind="openai-chat",
        key=key,
        auth={"authorization": f"Bearer {key}"},
        user_headers=user_headers,
        user_query=user_query,
    )


def root_route(
    root: str,
    path: str,
    *,
    kind: str,
    key: str,
    auth: Mapping[str, str],
    user_headers: dict[str, str],
    user_query: dict[str, str],
) -> Route:
    """The route to ``{root}{path}`` for an API root (OpenAI's or a native dialect's):
    ``auth`` are our headers, overridden by the caller's ``user_headers`` by name; the
    identity is ``kind`` and the root, never a key, header or query."""
    display, label, base_query = _split(root, "base_url")
    return Route(
        url=f"{display}{path}" + _query(base_query, urlencode(user_query)),
        headers=_headers(auth, user_headers),
        display=display,
        identity=f"{kind}:{display}",
        label=label,
        base_url=root,
        api_key=key,
        user_headers=user_headers,
        user_query=user_query,
    )


def _azure_key(api_key: str | None, user_headers: Mapping[str, str]) -> str | None:
    key = api_key or os.environ.get("AZURE_OPENAI_API_KEY")
    names = {name.lower() for name in user_headers}
    if not key and not names & {"api-key", "authorization"}:
        raise ConfigError(
            "no Azure credentials: pass api_key, set AZURE_OPENAI_API_KEY, or pass an "
            "'Authorization: Bearer <Entra ID token>' header in headers="
        )
    return key or None


def azure_route(
    *,
    azure_endpoint: str,
    azure_deployment: str | None,
    api_version: str | None,
    api_key: str | None,
    headers: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
) -> Route:
    """The route of an Azure OpenAI deployment (one adapter per deployment: Azure's
    quotas are per deployment, and so are the engine's limits)."""
    user_headers, user_query = _strings(headers, "headers"), _strings(query, "query")
    if not azure_deployment:
        raise ConfigError("azure_deployment is required with azure_endpoint")
    version = api_version or os.environ.get("OPENAI_API_VERSION")
    if not version:
        raise ConfigError("api_version is required with azure_endpoint (or $OPENAI_API_VERSION)")
    key = _azure_key(api_key, user_headers)
    display, label, _ = _split(azure_endpoint, "azure_endpoint")
    path = f"/openai/deployments/{quote(azure_deployment, safe='')}"
    version_query = urlencode({"api-version": version})
    return Route(
        url=f"{display}{path}/chat/completions" + _query(urlencode(user_query), version_query),
        headers=_headers({"api-key": key} if key else {}, user_headers),
        display=f"{display}{path}",
        identity=f"openai-chat:azure:{display}{path}?{version_query}",
        label=f"{label}{path}",
        base_url=display,
        api_key=key,
        user_headers=user_headers,
        user_query=user_query,
        azure_endpoint=display,
        azure_deployment=azure_deployment,
        api_version=version,
    )
