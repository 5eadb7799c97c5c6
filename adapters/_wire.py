"""The OpenAI chat-completions wire format, once for every transport and adapter.

One place for each rule (issue #13): the request body's encoding, the response's
parsing into a `engine.Completion`, the translation of HTTP statuses into the engine's
error tree, the ``Retry-After`` and ``x-ratelimit-*`` headers, and the structured-output
ladder.  Both transports of `OpenAIChat` (aiohttp and the SDK) hand this module a
`RawResponse`; the Batch adapter parses its output lines with `parse_completion`.

Status translation::

    429 + "insufficient_quota"       QuotaExceededError   fatal: billing, waiting won't help
    429                              RateLimitedError     Retry-After: retry-after-ms, then
                                                          retry-after (seconds or HTTP date)
    401 / 403                        AuthenticationError  fatal
    408 / 409 / 425 / 5xx            TransientError       retried
    400 / 404 / 413 / 422            BadRequestError      the request itself is wrong
    anything else (3xx included)     PermanentError
    200 with null content            NoContentError       refusal, tool call, content filter
    200 with an unreadable body      TransientError       "malformed response body"; the
                                                          tokens its usage bills ride along
    200, not UTF-8 / lone surrogate  TransientError       tried twice only: will not parse

``content`` given as a list of parts (Mistral) is read as its text parts joined.
"""

from __future__ import annotations

import email.utils
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from engine import (
    AuthenticationError,
    BadRequestError,
    Completion,
    ConfigError,
    NoContentError,
    PermanentError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    RateLimitSnapshot,
    TransientError,
    Usage,
)

__all__ = [
    "FormatLadder",
    "RawResponse",
    "decode_json",
    "encode_json",
    "parse_completion",
    "parse_duration",
    "parse_rate_limits",
    "parse_response",
    "parse_retry_after",
    "resolve_api_key",
    "scrub",
    "translate_status",
]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
# The marker the engine's own redaction uses (engine._redact.REDACTED).
REDACTED = "[REDACTED]"
# Attempts for an answer whose bytes cannot be text (invalid UTF-8, a lone surrogate):
# one retry, in case the bytes were damaged on the way, and no more.
_UNREADABLE_ATTEMPTS = 2
# How much of an error body a message quotes: enough for the provider's sentence,
# not a gateway's whole HTML page.
_DETAIL_CHARS = 300


@dataclass(frozen=True, slots=True)
class RawResponse:
    """An HTTP answer as a transport received it: status, headers, the whole body."""

    status: int
    headers: Mapping[str, str]  # case-insensitive in both transports
    body: bytes


# -- JSON ---------------------------------------------------------------------------------
def _encode_default(value: Any) -> Any:
    # orjson knows dict/list/tuple; messages and params may be read-only mappings
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_json(value: Any) -> bytes:
    """``value`` as compact JSON bytes (orjson; NaN becomes null)."""
    try:
        return orjson.dumps(value, default=_encode_default)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise BadRequestError(f"the request body is not JSON: {exc}") from exc


def decode_json(body: bytes) -> Any:
    """Parse JSON bytes; raises ``ValueError`` (orjson.JSONDecodeError) when invalid."""
    return orjson.loads(body)


# -- headers ------------------------------------------------------------------------------
def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``."""
    if not text:
        return None
    total, matched = 0.0, False
    for number, unit in _DURATION.findall(text):
        matched = True
        total += float(number) * _UNITS[unit]
    if matched:
        return total
    try:
        return float(text)
    except ValueError:
        return None


# What an infinite (``inf``, ``1e999``) header count is read as: more than any limit a
# provider means, so the engine ignores it and says so rather than failing the call.
_BEYOND_ANY_LIMIT = 2**63 - 1


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = float(value)
        return int(number)
    except ValueError:  # not a number (nan too)
        return None
    except OverflowError:  # inf, 1e999
        return _BEYOND_ANY_LIMIT if number > 0 else -_BEYOND_ANY_LIMIT


def parse_rate_limits(headers: Mapping[str, str]) -> RateLimitSnapshot | None:
    """The ``x-ratelimit-*`` headers of a response, or ``None`` when it has none."""
    # six lookups in a case-insensitive mapping beat lower-casing every header name
    if not any(name in headers for name in _LIMIT_HEADERS):
        return None
    get = headers.get
    return RateLimitSnapshot(
        limit_requests=_int(get("x-ratelimit-limit-requests")),
        limit_tokens=_int(get("x-ratelimit-limit-tokens")),
        remaining_requests=_int(get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(get("x-ratelimit-remaining-tokens")),
        reset_requests=parse_duration(get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(get("x-ratelimit-reset-tokens")),
    )


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """``retry-after-ms``, then ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value) if value else None
        except (TypeError, ValueError):
            return None
        return max(0.0, parsed.timestamp() - time.time()) if parsed is not None else None


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """The key to send: given, else ``$OPENAI_API_KEY``; local servers may go without."""
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url is None:
        raise ConfigError("no API key: pass api_key or set OPENAI_API_KEY")
    return "no-key"


# -- errors -------------------------------------------------------------------------------
def _error_fields(body: bytes) -> tuple[str | None, str, str]:
    """``(message, code, type)`` of an OpenAI-style error body; empty when absent."""
    try:
        data = decode_json(body)
    except ValueError:
        return None, "", ""
    error = data.get("error", data) if isinstance(data, dict) else None
    if isinstance(error, str):
        return error, "", ""
    if not isinstance(error, dict):
        return None, "", ""
    message = error.get("message")
    return (
        message if isinstance(message, str) and message else None,
        str(error.get("code") or ""),
        str(error.get("type") or ""),
    )


def _body_text(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", "replace").split())
    return text[:_DETAIL_CHARS] + ("..." if len(text) > _DETAIL_CHARS else "")


def scrub(text: str, secrets: Sequence[str]) -> str:
    """``text`` without any of ``secrets`` (sorted by length, as `Route.secrets` is)."""
    # longest first, so a token inside a longer header value goes with it
    for secret in reversed(secrets):
        text = text.replace(secret, REDACTED)
    return text


def translate_status(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    endpoint: str,
    secrets: Sequence[str] = (),
) -> ProviderError:
    """The engine error for a non-2xx answer (see the table in the module docstring).

    ``secrets`` (sorted by length) are removed from the quoted error text by value: a
    gateway that echoes a key of no known shape must not put it in an error.
    """
    message, code, kind = _error_fields(body)
    detail = scrub((message or _body_text(body) or "no body")[: _DETAIL_CHARS * 2], secrets)
    if status == 429:
        if "insufficient_quota" in (code, kind):
            return QuotaExceededError(
                f"the account is out of quota (insufficient_quota): {detail}",
                endpoint=endpoint,
                status=status,
            )
        return RateLimitedError(
            detail, retry_after=parse_retry_after(headers), endpoint=endpoint, status=status
        )
    if status in (401, 403):
        return AuthenticationError(
            "the endpoint rejected the credentials", endpoint=endpoint, status=status
        )
    if status in (408, 409, 425) or status >= 500:
        return TransientError(detail, endpoint=endpoint, status=status)
    if status in (400, 404, 413, 422):
        return BadRequestError(detail, endpoint=endpoint, status=status)
    if 300 <= status < 400 and headers.get("location"):
        # API calls are never redirected on purpose: a wrong scheme or path in base_url
        detail = scrub(f"redirected to {headers['location']}; point the base URL there", secrets)
    return PermanentError(detail, endpoint=endpoint, status=status)


# -- responses ----------------------------------------------------------------------------
def _no_content(message: Mapping[str, Any], finish_reason: Any, endpoint: str) -> NoContentError:
    reason = str(finish_reason) if finish_reason is not None else None
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        text = f"the model refused (finish_reason {reason}): refusal: {refusal!r}"
    elif message.get("tool_calls"):
        text = f"the model answered with tool calls, no text (finish_reason {reason})"
    elif reason == "content_filter":
        text = "the provider's content filter withheld the answer (finish_reason content_filter)"
    else:
        text = f"the answer has no text (finish_reason {reason})"
    return NoContentError(
        text,
        finish_reason=reason,
        refusal=refusal if isinstance(refusal, str) else None,
        endpoint=endpoint,
    )


def _usage(data: Any) -> Usage | None:
    """The ``usage`` a body reports, as given (negative counts too: the engine clamps
    and announces them), or ``None`` when there is none or it is unreadable."""
    usage = data.get("usage") if isinstance(data, Mapping) else None
    if not isinstance(usage, Mapping):
        return None
    try:
        return Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    except (TypeError, ValueError, OverflowError):
        return None


def _text(content: Any) -> Any:
    """``content`` as text: a string as is; a list of parts (Mistral, and OpenAI's
    own multi-part messages) as its text parts joined (``None`` when it has none: no
    text, like a null content); anything else unchanged."""
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts) if texts else None


def _malformed(reason: str, data: Any, endpoint: str, status: int | None) -> TransientError:
    error = TransientError(f"malformed response body ({reason})", endpoint=endpoint, status=status)
    error.billed = _usage(data)  # a body with no usable choice may still be billed
    return error


def parse_completion(
    data: Any, *, endpoint: str, rate_limits: RateLimitSnapshot | None = None
) -> Completion:
    """A chat-completion body (parsed JSON) as a `Completion`.

    Raises `NoContentError` when the first choice has no text (``content`` null: a
    refusal, tool calls, a content filter): never an empty prediction.  Raises
    `TransientError` when the body does not have the chat-completion shape, carrying
    the tokens it says were billed (``billed``).
    """
    try:
        choice = data["choices"][0]
        message = choice["message"]
        content = _text(message.get("content"))
        finish_reason = choice.get("finish_reason")
        model = data.get("model")
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise _malformed(type(exc).__name__, data, endpoint, 200) from exc
    usage = data.get("usage") if isinstance(data, Mapping) else None
    tokens = _usage(data)
    if tokens is None and usage:  # usage present but not numbers: as before, malformed
        raise _malformed("usage is not numbers", data, endpoint, 200)
    if content is None or (content == "" and finish_reason == "content_filter"):
        raise _no_content(message, finish_reason, endpoint)
    if not isinstance(content, str):
        raise _malformed("content is not text", data, endpoint, None)
    return Completion(
        text=content,
        usage=tokens or Usage(),
        model=str(model) if model is not None else None,
        finish_reason=str(finish_reason) if finish_reason is not None else None,
        rate_limits=rate_limits,
    )


def parse_response(raw: RawResponse, *, endpoint: str) -> Completion:
    """A 2xx `RawResponse` as a `Completion` (see `parse_completion`).

    A body that is not valid UTF-8, or escapes a lone surrogate, will read no better
    the next time: its error is tried once more at most (``attempt_cap``), not paid
    for the whole retry policy.
    """
    try:
        data = decode_json(raw.body)
    except ValueError as exc:
        error = TransientError(
            f"malformed response body ({type(exc).__name__}: {str(exc)[:80]})",
            endpoint=endpoint,
            status=raw.status,
        )
        if any(word in str(exc) for word in ("UTF-8", "surrogate")):
            error.attempt_cap = _UNREADABLE_ATTEMPTS
        raise error from exc
    return parse_completion(data, endpoint=endpoint, rate_limits=parse_rate_limits(raw.headers))


# -- structured output --------------------------------------------------------------------
_LADDER = ("json_schema", "json_object", "text")
_FORMAT_WORDS = ("response_format", "schema", "json")


def _wants_schema(requested: Any) -> bool:
    return isinstance(requested, Mapping) and requested.get("type") == "json_schema"


class FormatLadder:
    """The best structured-output mode an endpoint accepts: ``json_schema``, then
    ``json_object`` (with the schema alongside, as llama.cpp takes it), then plain text.

    Learned on failure and kept for the endpoint's lifetime.  Only a request that asked
    for ``json_schema`` is ever changed; every other ``response_format`` goes as given.
    """

    __slots__ = ("mode",)

    def __init__(self) -> None:
        self.mode = _LADDER[0]  # the mode the next json_schema request is sent with

    def outgoing(self, requested: Any) -> Any:
        """What to send for ``requested`` now (``None``: send no response_format)."""
        if not _wants_schema(requested):
            return requested
        if self.mode == "json_schema":
            return dict(requested)
        if self.mode == "json_object":
            schema = (requested.get("json_schema") or {}).get("schema")
            return {"type": "json_object", **({"schema": schema} if schema else {})}
        return None  # plain text; the caller parses defensively

    def step_down(self, requested: Any, sent_mode: str, body: bytes) -> bool:
        """After a 400/422/500 to a request sent in ``sent_mode``: True if the failure
        was about the format and the request should be retried in the (new) mode."""
        if not _wants_schema(requested):
            return False
        text = body.decode("utf-8", "replace").lower()
        if not any(word in text for word in _FORMAT_WORDS):
            return False
        if sent_mode != self.mode:
            return True  # a concurrent request stepped down already: one step per rung
        index = _LADDER.index(self.mode)
        if index + 1 >= len(_LADDER):
            return False
        self.mode = _LADDER[index + 1]
        return True
