"""The Gemini API's ``generateContent`` wire format: request, answer, statuses.

One place for each rule of the dialect, as ``adapters._wire`` is for OpenAI's.  Gemini
sends no rate-limit headers; its 429 says everything in ``google.rpc`` details.

Status translation::

    429 + QuotaFailure with a per-day quota id   QuotaExceededError   fatal: the day's
                                                                      quota is spent
    429 (RESOURCE_EXHAUSTED)                     RateLimitedError     RetryInfo.retryDelay
                                                                      ("12s"): the gate
    400 + ErrorInfo API_KEY_INVALID, 401, 403    AuthenticationError  fatal
    408 / 409 / 425 / 5xx (UNAVAILABLE...)       TransientError       retried
    400 / 404 / 413 / 422                        BadRequestError
    anything else                                PermanentError
    200, finishReason SAFETY / RECITATION /      NoContentError       no text, never an
      PROHIBITED_CONTENT / BLOCKLIST / SPII,                          empty prediction
      a blocked prompt, or no text at all
    200 with an unreadable body                  TransientError       "malformed response body"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from engine import (
    AuthenticationError,
    BadRequestError,
    Completion,
    NoContentError,
    PermanentError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
    Usage,
)

from ._wire import RawResponse, _body_text, decode_json, parse_duration, parse_retry_after, scrub

__all__ = [
    "encode_request",
    "gemini_response_format",
    "parse_response",
    "translate_status",
]

_RPC = "type.googleapis.com/google.rpc."
_BLOCKED = frozenset({"SAFETY", "RECITATION", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII"})
# JSON Schema keywords Gemini's OpenAPI-subset responseSchema refuses.
_UNSUPPORTED_SCHEMA_KEYS = frozenset({"additionalProperties", "$schema", "strict", "$defs"})
_DETAIL_CHARS = 600
_CONFIG = {
    "temperature": "temperature",
    "top_p": "topP",
    "top_k": "topK",
    "seed": "seed",
    "presence_penalty": "presencePenalty",
    "frequency_penalty": "frequencyPenalty",
}


# -- requests -----------------------------------------------------------------------------
def _schema(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _schema(v) for k, v in value.items() if k not in _UNSUPPORTED_SCHEMA_KEYS}
    if isinstance(value, list):
        return [_schema(v) for v in value]
    return value


def gemini_response_format(requested: Mapping[str, Any] | None) -> dict[str, Any]:
    """``generationConfig`` fields for an OpenAI-style ``response_format``: JSON output
    (``responseMimeType``) and, for ``json_schema``, its schema as ``responseSchema``."""
    if not isinstance(requested, Mapping) or requested.get("type") not in (
        "json_schema",
        "json_object",
    ):
        return {}
    fields: dict[str, Any] = {"responseMimeType": "application/json"}
    schema = (requested.get("json_schema") or {}).get("schema")
    if requested.get("type") == "json_schema" and isinstance(schema, Mapping):
        fields["responseSchema"] = _schema(schema)
    return fields


def _parts(text: Any) -> list[dict[str, str]]:
    return [{"text": str(text)}]


def encode_request(
    messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
) -> dict[str, Any]:
    """The generateContent body: system messages as ``systemInstruction``, the rest as
    ``user`` / ``model`` turns, sampling and JSON output in ``generationConfig``."""
    system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
    contents = [
        {"role": "model" if m.get("role") == "assistant" else "user", "parts": _parts(m["content"])}
        for m in messages
        if m.get("role") != "system"
    ]
    config: dict[str, Any] = {
        name: params[key] for key, name in _CONFIG.items() if params.get(key) is not None
    }
    cap = params.get("max_tokens") or params.get("max_completion_tokens")
    if isinstance(cap, int) and cap > 0:
        config["maxOutputTokens"] = cap
    stop = params.get("stop")
    if stop is not None:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    config.update(gemini_response_format(params.get("response_format")))
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": _parts("\n\n".join(system))}
    if config:
        body["generationConfig"] = config
    return body


# -- errors -------------------------------------------------------------------------------
def _error(body: bytes) -> tuple[str | None, str, list[Mapping[str, Any]]]:
    """``(message, status, details)`` of a google.rpc error body."""
    try:
        data = decode_json(body)
    except ValueError:
        return None, "", []
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, "", []
    message = error.get("message")
    details = error.get("details")
    return (
        message if isinstance(message, str) and message else None,
        str(error.get("status") or ""),
        [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else [],
    )


def _detail(details: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any] | None:
    return next((d for d in details if d.get("@type") == f"{_RPC}{kind}"), None)


def _daily_quota(details: Sequence[Mapping[str, Any]]) -> str | None:
    """The per-day quota id a QuotaFailure names, if any."""
    failure = _detail(details, "QuotaFailure") or {}
    for violation in failure.get("violations") or ():
        quota = str(violation.get("quotaId") or "") if isinstance(violation, Mapping) else ""
        if "PerDay" in quota:
            return quota
    return None


def retry_delay(details: Sequence[Mapping[str, Any]], headers: Mapping[str, str]) -> float | None:
    """RetryInfo's ``retryDelay`` ("12s", "0.5s") in seconds, else a Retry-After header."""
    info = _detail(details, "RetryInfo")
    delay = parse_duration(str(info.get("retryDelay") or "")) if info else None
    return delay if delay is not None else parse_retry_after(headers)


def translate_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    secrets: Sequence[str] = (),
) -> ProviderError:
    """The engine error for a non-2xx answer (the table in the module docstring)."""
    message, kind, details = _error(body)
    detail = scrub((message or _body_text(body) or "no body")[:_DETAIL_CHARS], secrets)
    if status == 429:
        quota = _daily_quota(details)
        if quota is not None:
            return QuotaExceededError(
                f"the daily quota is spent ({quota}): {detail}", endpoint=endpoint, status=status
            )
        delay = retry_delay(details, headers)
        return RateLimitedError(detail, retry_after=delay, endpoint=endpoint, status=status)
    reason = str((_detail(details, "ErrorInfo") or {}).get("reason") or "")
    if status in (401, 403) or reason == "API_KEY_INVALID":
        return AuthenticationError(
            "the endpoint rejected the credentials", endpoint=endpoint, status=status
        )
    if status in (408, 409, 425) or status >= 500:
        return TransientError(f"{kind or 'error'}: {detail}", endpoint=endpoint, status=status)
    if status in (400, 404, 413, 422):
        return BadRequestError(detail, endpoint=endpoint, status=status)
    return PermanentError(detail, endpoint=endpoint, status=status)


# -- answers ------------------------------------------------------------------------------
def _usage(meta: Any) -> Usage:
    """Gemini's prompt count includes cached tokens; they are priced apart here."""
    if not isinstance(meta, Mapping):
        return Usage()
    cached = int(meta.get("cachedContentTokenCount") or 0)
    prompt = int(meta.get("promptTokenCount") or 0)
    output = int(meta.get("candidatesTokenCount") or 0) + int(meta.get("thoughtsTokenCount") or 0)
    return Usage(max(0, prompt - cached), output, 0, cached)


def _no_content(reason: str | None, endpoint: str) -> NoContentError:
    if reason in _BLOCKED:
        text = f"the provider withheld the answer (finishReason {reason})"
    else:
        text = f"the answer has no text (finishReason {reason})"
    return NoContentError(text, finish_reason=reason, endpoint=endpoint)


def parse_response(raw: RawResponse, *, endpoint: str) -> Completion:
    """A 2xx generateContent answer as a `Completion` (its first candidate's text)."""
    try:
        data = decode_json(raw.body)
        candidates = data.get("candidates") or []
        blocked = (data.get("promptFeedback") or {}).get("blockReason")
        candidate = candidates[0] if candidates else {}
        parts = (candidate.get("content") or {}).get("parts") or []
        texts = [p["text"] for p in parts if "text" in p and not p.get("thought")]
        reason = candidate.get("finishReason") or blocked
        usage = _usage(data.get("usageMetadata"))
        model = data.get("modelVersion")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise TransientError(
            f"malformed response body ({type(exc).__name__})", endpoint=endpoint, status=200
        ) from exc
    if not all(isinstance(t, str) for t in texts):
        raise TransientError("malformed response body (a part is not text)", endpoint=endpoint)
    reason = str(reason) if reason is not None else None
    if reason in _BLOCKED or not texts:
        raise _no_content(reason, endpoint)
    return Completion(
        text="".join(texts),
        usage=usage,
        model=str(model) if model is not None else None,
        finish_reason=reason,
    )
