"""JSON for cache values: orjson where it can, the standard library where it cannot.

Cache *values* (a prediction, a metric result) are written and read once per example
on the hot path; their bytes are never hashed, so the fastest correct codec wins.
Hashed text (cache *keys*, prompt hashes) stays on `canonical_json`, whose output is
the standard library's and stable across versions.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dump_value", "load_value"]


def dump_value(value: Any) -> str:
    """``value`` as JSON text (keys sorted; what orjson cannot encode, such as integers
    over 64 bits or non-string keys in a metric's trace, goes through the standard
    library, with other objects as their ``str``)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)


def load_value(text: str) -> Any:
    """Parse JSON text; raises `ValueError` when it is not JSON."""
    return orjson.loads(text)
