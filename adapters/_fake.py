"""The simulated provider's answers: one body and one token rule for every route.

The chat route (`adapters.simulated_server`) and the Batch API simulation
(`adapters.simulated_batches`) build their completion bodies and count tokens here and
nowhere else, so the two cannot drift apart (issue #13, "one place for each rule").
Tokens follow the usual 4-characters rule, plus one.

A body may also come without text, as real providers answer: a ``refusal`` (content
null, a ``refusal`` string), ``tool_calls`` (content null, finish reason
``tool_calls``), or ``content_filter`` (content null, finish reason ``content_filter``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "NULL_CONTENT_KINDS",
    "REFUSAL_TEXT",
    "completion_body",
    "completion_tokens",
    "prompt_tokens",
]

NULL_CONTENT_KINDS = ("refusal", "tool_calls", "content_filter")
REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


def prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Tokens billed for the request's messages."""
    return sum(len(str(m.get("content", ""))) for m in messages) // 4 + 1


def completion_tokens(text: str) -> int:
    """Tokens billed for an answer's text."""
    return len(text) // 4 + 1


def cut_to_max_tokens(answer: str, request: Mapping[str, Any]) -> tuple[str, str]:
    """An answer cut to the request's ``max_tokens`` (counted as this server counts),
    as providers do, and the finish reason that says whether it was cut."""
    cap = request.get("max_tokens") or request.get("max_completion_tokens")
    if isinstance(cap, int) and cap > 0 and completion_tokens(answer) > cap:
        return answer[: 4 * (cap - 1)], "length"
    return answer, "stop"


def _message(
    answer: str, null_content: str | None, request: Mapping[str, Any]
) -> tuple[dict[str, Any], str, str]:
    """``(message, finish_reason, billed text)`` of the assistant's answer."""
    if null_content is None:
        text, finish_reason = cut_to_max_tokens(answer, request)
        return {"role": "assistant", "content": text}, finish_reason, text
    if null_content == "refusal":
        message = {"role": "assistant", "content": None, "refusal": REFUSAL_TEXT}
        return message, "stop", REFUSAL_TEXT
    if null_content == "tool_calls":
        call = {
            "id": "call_0",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"query": "answer"}'},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls", ""
    if null_content == "content_filter":
        return {"role": "assistant", "content": None}, "content_filter", ""
    raise ValueError(f"null_content must be one of {NULL_CONTENT_KINDS}, got {null_content!r}")


def completion_body(
    completion_id: str,
    request: Mapping[str, Any],
    answer: str,
    *,
    null_content: str | None = None,
) -> dict[str, Any]:
    """The ``chat.completion`` object answering ``request`` (the parsed request body)
    with ``answer``, or with no text when ``null_content`` names a kind."""
    message, finish_reason, billed = _message(answer, null_content, request)
    prompt = prompt_tokens(request.get("messages") or ())
    completion = completion_tokens(billed)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "simulated"),
        "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
