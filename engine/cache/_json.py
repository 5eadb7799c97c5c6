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

__all__ = ["dump_value", "escape_key_part", "exact_value", "load_value", "unstorable"]

_INT_RANGE = range(-(2**63), 2**64)  # what orjson reads back as an int (not a float)


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


def exact_value(value: Any, where: str = "") -> Any:
    """``value`` as JSON data that `load_value` reads back equal and of the same types:
    None, bool, int (64-bit), finite float, str, lists, and dicts with str keys; a NumPy
    scalar (anything with ``shape == ()`` whose ``item()`` is one of those) becomes the
    Python number.  Raises `ValueError` naming the first part that would come back as
    something else (a set or an object as its string, a tuple as a list, an int key as
    a str, NaN as null)."""
    kind = type(value)
    if value is None or kind in (bool, str):
        return value
    if kind is int and value in _INT_RANGE:
        return value
    if kind is float and value - value == 0.0:  # finite
        return value
    if kind is list:
        return [exact_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if kind is dict:
        for key in value:
            if type(key) is not str:
                raise ValueError(f"{where or 'it'} has the key {key!r}, not a str")
        return {k: exact_value(v, f"{where}[{k!r}]") for k, v in value.items()}
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == () and kind.__module__ != "builtins":
        inner = item()
        if type(inner) in (bool, int, float, str):
            return exact_value(inner, where)
    raise ValueError(f"{where or 'it'} is {_shown(value)}, which would not come back as itself")


def _shown(value: Any) -> str:
    text = repr(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__qualname__} ({text})"
