"""Prompt and completion text for spans, only when the host opted in, redacted.

The GenAI conventions carry messages as JSON (``gen_ai.input.messages``,
``gen_ai.output.messages``); the text goes through the same redaction as events
(`engine._redact`): credential shapes and every registered key value.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from .._redact import redact_text
from .._types import Completion

__all__ = ["completion_content", "prompt_content"]


def prompt_content(messages: Sequence[Mapping[str, str]]) -> str:
    """The request's messages as the conventions' JSON, redacted."""
    parts = [
        {
            "role": m.get("role", "user"),
            "parts": [{"type": "text", "content": m.get("content", "")}],
        }
        for m in messages
    ]
    return redact_text(json.dumps(parts, ensure_ascii=False))


def completion_content(completion: Completion) -> str:
    """The answer as the conventions' JSON output message, redacted."""
    message = {
        "role": "assistant",
        "parts": [{"type": "text", "content": completion.text}],
        "finish_reason": completion.finish_reason or "stop",
    }
    return redact_text(json.dumps([message], ensure_ascii=False))
