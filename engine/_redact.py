"""Secret redaction for every text the engine emits: events, errors, reports."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

__all__ = ["REDACTED", "redact_event", "redact_text", "redact_value"]

REDACTED = "[REDACTED]"

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
_SECRET_FIELD = re.compile(r"(?i)(api[_-]?key|authorization|secret|password|token$)")


def redact_text(text: str) -> str:
    """Return ``text`` with anything shaped like a credential replaced."""
    if not text:
        return text
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
            k: (REDACTED if _SECRET_FIELD.search(str(k)) and v else redact_value(v))
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
        k: (REDACTED if _SECRET_FIELD.search(k) and v else redact_value(v))
        for k, v in event_dict.items()
    }
