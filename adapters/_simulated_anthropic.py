"""The simulated provider's Anthropic dialect: the Messages API's requests, answers,
errors and ``anthropic-ratelimit-*`` headers (see ``adapters._simulated_native``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from . import _fake
from ._simulated_base import parse_chat_request

__all__ = ["AnthropicDialect"]

_MALFORMED = b'{"id": "msg_x", "type": "message", "content": [{"type": "text", "text": '


def _rfc3339(seconds_from_now: float) -> str:
    moment = datetime.fromtimestamp(time.time() + seconds_from_now, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(kind: str, message: str, **details: str) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if details:
        error["details"] = details
    return {"type": "error", "error": error}


class AnthropicDialect:
    """``POST /v1/messages`` with ``x-api-key``; answers in the Messages shape."""

    name = "anthropic"
    paths: tuple[str, ...] = ("/v1/messages",)
    malformed = _MALFORMED

    def authorized(self, headers: Mapping[str, str], key: str | None) -> bool:
        return key is None or headers.get("x-api-key") == key

    def parse(self, raw: bytes, path_params: Mapping[str, str]) -> dict[str, Any] | None:
        """The request as the OpenAI-shaped body the server's answer function takes
        (``system`` back in front as a system message), or ``None`` if invalid."""
        body = parse_chat_request(raw)
        if body is None or not isinstance(body.get("max_tokens"), int):
            return None  # the real API refuses a request without it
        system = body.get("system")
        messages = ([{"role": "system", "content": system}] if system else []) + body["messages"]
        return {**body, "messages": messages}

    def answer(
        self, body: Mapping[str, Any], text: str, digest: str, null_content: bool
    ) -> tuple[dict[str, Any], int, int]:
        """``(answer body, input tokens, output tokens)``."""
        if null_content:
            billed, stop = _fake.REFUSAL_TEXT, "refusal"
        else:
            billed, reason = _fake.cut_to_max_tokens(text, body)
            stop = "max_tokens" if reason == "length" else "end_turn"
        prompt = _fake.prompt_tokens(body["messages"])
        output = _fake.completion_tokens(billed)
        answer = {
            "id": f"msg_{digest[:12]}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", "simulated"),
            "content": [{"type": "text", "text": billed}],
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": prompt,
                "output_tokens": output,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
        return answer, prompt, output

    def error(self, fault: str, message: str, wait: float) -> tuple[int, Any, dict[str, str]]:
        """``(status, body, headers)`` of a fault (see `_simulated_native.FAULTS`)."""
        if fault == "rate_limited":
            retry = {"retry-after": str(max(1, int(wait + 0.999)))}
            return 429, _error("rate_limit_error", message), retry
        if fault == "spend_limit":
            body = _error(
                "rate_limit_error",
                "You have reached your specified workspace API usage limits.",
                error_code="enforced_spend_limit_reached",
            )
            return 429, body, {}
        statuses = {
            "unauthorized": (401, "authentication_error"),
            "invalid": (400, "invalid_request_error"),
            "overloaded": (529, "overloaded_error"),
            "server_error": (500, "api_error"),
            "daily_quota": (402, "billing_error"),
        }
        status, kind = statuses[fault]
        return status, _error(kind, message), {}

    def limit_headers(self, state: Mapping[str, tuple[float, float, float]]) -> dict[str, str]:
        """``state``: bucket name -> (limit per minute, remaining, seconds to full)."""
        names = {"requests": "requests", "input": "input-tokens", "output": "output-tokens"}
        out: dict[str, str] = {}
        for bucket, (limit, remaining, reset) in state.items():
            prefix = f"anthropic-ratelimit-{names[bucket]}"
            out[f"{prefix}-limit"] = str(int(limit))
            out[f"{prefix}-remaining"] = str(int(remaining))
            out[f"{prefix}-reset"] = _rfc3339(reset)
        return out
