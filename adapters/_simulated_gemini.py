"""The simulated provider's Gemini dialect: ``generateContent``'s requests, answers and
``google.rpc`` errors (see ``adapters._simulated_native``).  Gemini sends no rate-limit
headers: a 429 says when to come back in a ``RetryInfo`` detail."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from . import _fake

__all__ = ["GeminiDialect"]

_MALFORMED = b'{"candidates": [{"content": {"parts": [{"text": '
_RPC = "type.googleapis.com/google.rpc."
DAILY_QUOTA_ID = "GenerateRequestsPerDayPerProjectPerModel"
MINUTE_QUOTA_ID = "GenerateRequestsPerMinutePerProjectPerModel"


def _error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def _quota_failure(quota_id: str) -> dict[str, Any]:
    violation = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
        "quotaId": quota_id,
    }
    return {"@type": f"{_RPC}QuotaFailure", "violations": [violation]}


def _text(content: Any) -> str:
    if not isinstance(content, Mapping):
        return ""
    parts = content.get("parts") or []
    return "".join(str(p.get("text", "")) for p in parts if isinstance(p, Mapping))


class GeminiDialect:
    """``POST /v1beta/models/{model}:generateContent`` with ``x-goog-api-key``."""

    name = "gemini"
    paths: tuple[str, ...] = ("/v1beta/models/{model}:generateContent",)
    malformed = _MALFORMED

    def authorized(self, headers: Mapping[str, str], key: str | None) -> bool:
        return key is None or headers.get("x-goog-api-key") == key

    def parse(self, raw: bytes, path_params: Mapping[str, str]) -> dict[str, Any] | None:
        """The request as an OpenAI-shaped body (system instruction first, ``model``
        turns as assistant), or ``None`` if it is not a generateContent request."""
        try:
            body = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(body, dict) or not isinstance(body.get("contents"), list):
            return None
        messages = []
        system = _text(body.get("systemInstruction"))
        if system:
            messages.append({"role": "system", "content": system})
        for turn in body["contents"]:
            role = "assistant" if isinstance(turn, dict) and turn.get("role") == "model" else "user"
            messages.append({"role": role, "content": _text(turn)})
        config = body.get("generationConfig") or {}
        cap = config.get("maxOutputTokens") if isinstance(config, dict) else None
        return {**body, "messages": messages, "model": path_params.get("model"), "max_tokens": cap}

    def answer(
        self, body: Mapping[str, Any], text: str, digest: str, null_content: bool
    ) -> tuple[dict[str, Any], int, int]:
        """``(answer body, input tokens, output tokens)``; a null content is a SAFETY
        block (a candidate without parts)."""
        prompt = _fake.prompt_tokens(body["messages"])
        if null_content:
            candidate: dict[str, Any] = {"finishReason": "SAFETY", "index": 0}
            output = 0
        else:
            billed, reason = _fake.cut_to_max_tokens(text, body)
            output = _fake.completion_tokens(billed)
            candidate = {
                "content": {"role": "model", "parts": [{"text": billed}]},
                "finishReason": "MAX_TOKENS" if reason == "length" else "STOP",
                "index": 0,
            }
        usage = {
            "promptTokenCount": prompt,
            "candidatesTokenCount": output,
            "totalTokenCount": prompt + output,
        }
        answer = {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": body.get("model") or "simulated",
            "responseId": digest[:16],
        }
        return answer, prompt, output

    def error(self, fault: str, message: str, wait: float) -> tuple[int, Any, dict[str, str]]:
        """``(status, body, headers)`` of a fault (see `_simulated_native.FAULTS`)."""
        if fault == "rate_limited":
            retry = {"@type": f"{_RPC}RetryInfo", "retryDelay": f"{wait:.3f}s"}
            body = _error(
                429, "RESOURCE_EXHAUSTED", message, _quota_failure(MINUTE_QUOTA_ID), retry
            )
            return 429, body, {}
        if fault in ("daily_quota", "spend_limit"):
            text = "You exceeded your current quota, please check your plan and billing details."
            retry = {"@type": f"{_RPC}RetryInfo", "retryDelay": "37s"}  # as Google sends it
            return (
                429,
                _error(429, "RESOURCE_EXHAUSTED", text, _quota_failure(DAILY_QUOTA_ID), retry),
                {},
            )
        if fault == "unauthorized":  # what Google answers to a wrong key: 400, not 401
            text = "API key not valid. Please pass a valid API key."
            info = {"@type": f"{_RPC}ErrorInfo", "reason": "API_KEY_INVALID"}
            return 400, _error(400, "INVALID_ARGUMENT", text, info), {}
        statuses = {
            "invalid": (400, "INVALID_ARGUMENT", message),
            "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            "server_error": (500, "INTERNAL", message),
        }
        status, kind, text = statuses[fault]
        return status, _error(status, kind, text), {}

    def limit_headers(self, state: Mapping[str, tuple[float, float, float]]) -> dict[str, str]:
        return {}  # Gemini announces nothing
