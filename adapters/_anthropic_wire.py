"""Anthropic's Messages API wire format: request, answer, statuses, rate-limit headers.

One place for each rule of the dialect, as ``adapters._wire`` is for OpenAI's.

Status translation::

    429 + error.details.error_code         QuotaExceededError   the spend limit: fatal,
        "enforced_spend_limit_reached"                          waiting won't help
    429 (rate_limit_error)                 RateLimitedError     retry-after: the pause gate
    402 (billing_error)                    QuotaExceededError   fatal
    529 (overloaded_error)                 TransientError       backoff; Anthropic is busy,
                                                                not the account's limit
    401 / 403                              AuthenticationError  fatal
    408 / 409 / 425 / 5xx                  TransientError       retried
    400 / 404 / 413 / 422                  BadRequestError      the request itself is wrong
    anything else                          PermanentError
    200, stop_reason "refusal"             NoContentError       with the refusal's text
    200 without a text block               NoContentError       (tool use only)
    200 with an unreadable body            TransientError       "malformed response body"

Rate-limit headers: ``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
{limit,remaining,reset}``; a reset is an RFC 3339 time, read as seconds from now.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
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
    RateLimitSnapshot,
    TransientError,
    Usage,
)

from ._wire import RawResponse, _body_text, decode_json, parse_retry_after, scrub

__all__ = [
    "API_VERSION",
    "DEFAULT_MAX_TOKENS",
    "encode_request",
    "parse_rate_limits",
    "parse_reset",
    "parse_response",
    "translate_status",
]

API_VERSION = "2023-06-01"
# The Messages API requires max_tokens; this is sent when the prompt sets none.
DEFAULT_MAX_TOKENS = 1024
SPEND_LIMIT = "enforced_spend_limit_reached"
_PREFIX = "anthropic-ratelimit-"
# OpenAI's parameters the Messages API would refuse; ``stop`` is renamed instead.
_NOT_SENT = frozenset(
    {
        "frequency_penalty",
        "logit_bias",
        "logprobs",
        "max_completion_tokens",
        "n",
        "presence_penalty",
        "response_format",
        "seed",
        "stop",
        "top_logprobs",
        "user",
    }
)
_DETAIL_CHARS = 600


# -- requests -----------------------------------------------------------------------------
def encode_request(
    messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], *, default_max_tokens: int
) -> dict[str, Any]:
    """The Messages API body: system messages joined into the top-level ``system``,
    the rest as user/assistant turns, ``max_tokens`` always set, ``stop`` renamed to
    ``stop_sequences``.  ``response_format`` is not sent (plain text; see the adapter)."""
    system = [str(m.get("content", "")) for m in messages if m.get("role") == "system"]
    turns = [
        {"role": "assistant" if m.get("role") == "assistant" else "user", "content": m["content"]}
        for m in messages
        if m.get("role") != "system"
    ]
    body: dict[str, Any] = {k: v for k, v in params.items() if k not in _NOT_SENT}
    body["messages"] = turns
    if system:
        body["system"] = "\n\n".join(system)
    cap = params.get("max_tokens") or params.get("max_completion_tokens")
    body["max_tokens"] = cap if isinstance(cap, int) and cap > 0 else default_max_tokens
    stop = params.get("stop")
    if stop is not None and "stop_sequences" not in body:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    return body


# -- headers ------------------------------------------------------------------------------
def parse_reset(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from now until an RFC 3339 time (``2026-01-01T00:00:30Z``), at least 0."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def parse_rate_limits(headers: Mapping[str, str]) -> RateLimitSnapshot | None:
    """The ``anthropic-ratelimit-*`` headers of a response, or ``None`` without any."""
    get = headers.get
    if get(f"{_PREFIX}requests-limit") is None and get(f"{_PREFIX}input-tokens-limit") is None:
        return None
    return RateLimitSnapshot(
        limit_requests=_int(get(f"{_PREFIX}requests-limit")),
        remaining_requests=_int(get(f"{_PREFIX}requests-remaining")),
        reset_requests=parse_reset(get(f"{_PREFIX}requests-reset")),
        limit_tokens=_int(get(f"{_PREFIX}tokens-limit")),
        remaining_tokens=_int(get(f"{_PREFIX}tokens-remaining")),
        reset_tokens=parse_reset(get(f"{_PREFIX}tokens-reset")),
        limit_input_tokens=_int(get(f"{_PREFIX}input-tokens-limit")),
        remaining_input_tokens=_int(get(f"{_PREFIX}input-tokens-remaining")),
        reset_input_tokens=parse_reset(get(f"{_PREFIX}input-tokens-reset")),
        limit_output_tokens=_int(get(f"{_PREFIX}output-tokens-limit")),
        remaining_output_tokens=_int(get(f"{_PREFIX}output-tokens-remaining")),
        reset_output_tokens=parse_reset(get(f"{_PREFIX}output-tokens-reset")),
    )


# -- errors -------------------------------------------------------------------------------
def _error_fields(body: bytes) -> tuple[str | None, str, str]:
    """``(message, type, details.error_code)`` of an Anthropic error body."""
    try:
        data = decode_json(body)
    except ValueError:
        return None, "", ""
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, "", ""
    message = error.get("message")
    details = error.get("details")
    code = details.get("error_code") if isinstance(details, dict) else None
    return (
        message if isinstance(message, str) and message else None,
        str(error.get("type") or ""),
        str(code or ""),
    )


def translate_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    secrets: Sequence[str] = (),
) -> ProviderError:
    """The engine error for a non-2xx answer (the table in the module docstring);
    ``secrets`` are scrubbed from the quoted text by value."""
    message, kind, code = _error_fields(body)
    detail = scrub((message or _body_text(body) or "no body")[:_DETAIL_CHARS], secrets)
    if status == 429 and code == SPEND_LIMIT:
        return QuotaExceededError(
            f"the workspace's spend limit is reached ({SPEND_LIMIT}): {detail}",
            endpoint=endpoint,
            status=status,
        )
    if status == 429:
        return RateLimitedError(
            detail, retry_after=parse_retry_after(headers), endpoint=endpoint, status=status
        )
    if status == 402 or kind == "billing_error":
        return QuotaExceededError(
            f"the account cannot be billed ({kind or 'billing_error'}): {detail}",
            endpoint=endpoint,
            status=status,
        )
    if status == 529 or kind == "overloaded_error":
        return TransientError(
            f"the provider is overloaded (overloaded_error): {detail}",
            endpoint=endpoint,
            status=status,
        )
    if status in (401, 403):
        return AuthenticationError(
            "the endpoint rejected the credentials", endpoint=endpoint, status=status
        )
    if status in (408, 409, 425) or status >= 500:
        return TransientError(detail, endpoint=endpoint, status=status)
    if status in (400, 404, 413, 422):
        return BadRequestError(detail, endpoint=endpoint, status=status)
    return PermanentError(detail, endpoint=endpoint, status=status)


# -- answers ------------------------------------------------------------------------------
def _malformed(what: str, endpoint: str) -> TransientError:
    return TransientError(f"malformed response body ({what})", endpoint=endpoint, status=200)


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, Mapping):
        return Usage()
    return Usage(
        int(usage.get("input_tokens") or 0),
        int(usage.get("output_tokens") or 0),
        int(usage.get("cache_creation_input_tokens") or 0),
        int(usage.get("cache_read_input_tokens") or 0),
    )


def _no_content(text: str, stop_reason: str | None, endpoint: str) -> NoContentError:
    if stop_reason == "refusal":
        return NoContentError(
            f"the model refused (stop_reason refusal): refusal: {text!r}",
            finish_reason=stop_reason,
            refusal=text or None,
            endpoint=endpoint,
        )
    return NoContentError(
        f"the answer has no text (stop_reason {stop_reason})",
        finish_reason=stop_reason,
        endpoint=endpoint,
    )


def parse_response(raw: RawResponse, *, endpoint: str) -> Completion:
    """A 2xx Messages API answer as a `Completion` (its text blocks joined)."""
    try:
        data = decode_json(raw.body)
        blocks = data["content"]
        texts = [b["text"] for b in blocks if isinstance(b, dict) and b.get("type") == "text"]
        text = "".join(texts)
        stop_reason = data.get("stop_reason")
        usage = _usage(data.get("usage"))
        model = data.get("model")
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise _malformed(type(exc).__name__, endpoint) from exc
    if not all(isinstance(t, str) for t in texts):
        raise _malformed("a text block is not text", endpoint)
    reason = str(stop_reason) if stop_reason is not None else None
    if reason == "refusal" or not texts:
        raise _no_content(text, reason, endpoint)
    return Completion(
        text=text,
        usage=usage,
        model=str(model) if model is not None else None,
        finish_reason=reason,
        rate_limits=parse_rate_limits(raw.headers),
    )
