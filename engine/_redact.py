"""Secret redaction for every text the engine emits: events, errors, reports.

Two rules, both applied to every text: the shapes of credentials (``sk-...``, bearer
tokens, ``api_key=...`` pairs), and the exact values of the keys the engine was given
(`register_secret`: adapters register the keys they hold, the CLI the variables named
by ``api_key_env``), which catches a key of no known shape that a gateway echoes back in
an error body.

The registry of known values is process-wide on purpose: a secret must be redacted in
any text, whichever object produced it.  It holds values only, never names.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, MutableMapping
from typing import Any

from ._secrets import is_secret_name

__all__ = [
    "REDACTED",
    "known_secrets",
    "redact_event",
    "redact_text",
    "redact_value",
    "register_secret",
]

REDACTED = "[REDACTED]"
# Shorter values would redact ordinary words; no real credential is this short.
_MIN_SECRET_LENGTH = 8


class _KnownSecrets:
    """Exact secret values to redact, longest first (so a key containing another is
    replaced whole); thread-safe, since the SQLite writer thread formats errors too."""

    __slots__ = ("_lock", "_pattern", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))

    def values(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._values)

    def redact(self, text: str) -> str:
        pattern = self._pattern
        return pattern.sub(REDACTED, text) if pattern is not None else text


_KNOWN = _KnownSecrets()


def register_secret(value: str | None) -> None:
    """Redact ``value`` wherever it appears in what the engine emits from now on
    (events, error messages, reports, outcome files).  Values shorter than 8
    characters are ignored (they would redact ordinary words)."""
    if isinstance(value, str) and len(value.strip()) >= _MIN_SECRET_LENGTH:
        _KNOWN.add(value.strip())


def known_secrets() -> tuple[str, ...]:
    """Every value given to `register_secret` in this process (for a cluster's workers,
    which must redact the same values)."""
    return _KNOWN.values()


# Shapes of provider credentials: OpenAI-style ``sk-...`` keys, bearer tokens,
# ``api_key=...`` / ``"api_key": "..."`` pairs in URLs, JSON and reprs, and the
# password of a ``scheme://user:password@host`` URL (a database URL, a proxy).
_SECRET_PATTERNS = (
    re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s:/@]*:)([^\s/@]+)(?=@)"),
    re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"),
    re.compile(r"(?i)\bbearer\s+[A-Za-z0-9_\-\.=]{8,}"),
    re.compile(
        r"(?i)((?:api[_-]?key|authorization|x-api-key|access[_-]?token)"
        r"[\"']?\s*[:=]\s*[\"']?)([^\s\"'&,;}]{4,})"
    ),
)


def redact_text(text: str) -> str:
    """Return ``text`` with anything shaped like a credential replaced."""
    if not text:
        return text
    text = _KNOWN.redact(text)
    for pattern in _SECRET_PATTERNS:
        if pattern.groups == 2:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        else:
            text = pattern.sub(REDACTED, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact strings inside a JSON-like value, recursively."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_name(str(k)) and v else redact_value(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    if isinstance(value, BaseException):
        return redact_text(f"{type(value).__name__}: {value}")
    return value


def redact_event(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> Mapping[str, Any]:
    """A structlog processor that redacts secrets; hosts may add it to their chain."""
    return {
        k: (REDACTED if is_secret_name(k) and v else redact_value(v)) for k, v in event_dict.items()
    }
