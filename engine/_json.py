"""JSON for cache values: orjson where it can, the standard library where it cannot.

Cache *values* (a prediction, a metric result) are written and read once per example
on the hot path; their bytes are never hashed, so the fastest correct codec wins.
Hashed text (cache *keys*, prompt hashes) stays on `canonical_json`, whose output is
the standard library's and stable across versions.

Every value written here is text any store can hold (valid UTF-8, no NUL): a lone
surrogate (text read with ``surrogateescape``, say a code-running metric's stderr) is
written as the escape ``\\udcxx`` and read back as the same character, never dropped.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dump_value", "escape_key_part", "load_value", "unstorable"]


def dump_value(value: Any) -> str:
    """``value`` as JSON text (keys sorted) that `load_value` reads back as ``value``.

    What orjson refuses (a lone surrogate, an integer over 64 bits) goes through the
    standard library in ASCII form; what is not JSON at all raises `TypeError` (and
    NaN or infinity `ValueError`) rather than being written as something else.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        # ensure_ascii: a lone surrogate becomes the escape \udcxx, which every store
        # can hold and json.loads turns back into the same character
        return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=False)


def load_value(text: str) -> Any:
    """Parse JSON text; raises `ValueError` when it is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # orjson refuses an escaped lone surrogate, which `dump_value` may have written
        return json.loads(text)


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored as is in a SQLite or PostgreSQL text column (a
    lone surrogate is not UTF-8; PostgreSQL refuses NUL), or ``None`` when it can."""
    if "\x00" in text:
        return "it holds a NUL character"
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return f"it holds a lone surrogate {text[exc.start]!r} at {exc.start}"
    return None


def escape_key_part(text: str) -> str | None:
    """``text`` written as ASCII JSON when it cannot be stored as is (see `unstorable`),
    else ``None`` (the text is used unchanged)."""
    if unstorable(text) is None:
        return None
    return json.dumps(text, ensure_ascii=True)
