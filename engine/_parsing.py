"""Defensive parsing of JSON that LLMs wrap in fences, prose, or truncate."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["parse_json_object"]

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def _candidates(text: str) -> list[str]:
    text = text.strip()
    found = [m.group(1).strip() for m in _FENCE.finditer(text)]
    found.append(text)
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        found.append(text[start : end + 1])
    if end != -1 and (start == -1 or start > end):
        # a reply that lost its leading brace: '"messages": [...] }'
        found.append("{" + text[: end + 1])
    if start == -1 and text.startswith('"'):
        found.append("{" + text + "}")
    return found


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object found in ``text``: plain, fenced, amid prose, or missing
    its leading ``{``.  ``None`` when there is none."""
    for candidate in _candidates(text):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None
