"""`OpenAIChat`: any OpenAI-compatible chat endpoint through the official SDK.

HTTP stack: ``openai`` 3.x on ``httpx2`` (see README, "HTTP stack").  One pooled
``httpx2.AsyncClient`` per endpoint, sized to the concurrency limit, owned by this
object and closed by ``async with`` / `aclose`.  The SDK's own retries are off
(``max_retries=0``) so the engine's retry policy and limiter see every attempt; SDK
errors are translated into the engine's error tree ``from exc``.

Usage::

    async with OpenAIChat(base_url="http://127.0.0.1:8080/v1", limits=Limits(rpm=3000)) as chat:
        result = await evaluate(prompt, data, model=chat, metric=ExactMatch())
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx2
import openai

from engine import (
    AuthenticationError,
    BadRequestError,
    CallTimeoutError,
    Completion,
    ConfigError,
    Limits,
    PermanentError,
    RateLimitedError,
    RateLimitSnapshot,
    TransientError,
    Usage,
)

__all__ = [
    "OpenAIChat",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "resolve_api_key",
]

_FORMAT_LADDER = ("json_schema", "json_object", "text")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")


def parse_duration(text: str | None) -> float | None:
    """OpenAI's reset durations: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``."""
    if not text:
        return None
    total, matched = 0.0, False
    for number, unit in _DURATION.findall(text):
        matched = True
        total += float(number) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if matched:
        return total
    try:
        return float(text)
    except ValueError:
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def parse_rate_limits(headers: Mapping[str, str]) -> RateLimitSnapshot | None:
    """The ``x-ratelimit-*`` headers of a response, or ``None`` when it has none."""
    if not any(k.lower().startswith("x-ratelimit-") for k in headers):
        return None
    return RateLimitSnapshot(
        limit_requests=_int(headers.get("x-ratelimit-limit-requests")),
        limit_tokens=_int(headers.get("x-ratelimit-limit-tokens")),
        remaining_requests=_int(headers.get("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(headers.get("x-ratelimit-remaining-tokens")),
        reset_requests=parse_duration(headers.get("x-ratelimit-reset-requests")),
        reset_tokens=parse_duration(headers.get("x-ratelimit-reset-tokens")),
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
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed is not None else None


def resolve_api_key(api_key: str | None, base_url: str | None) -> str:
    """The key to send: given, else ``$OPENAI_API_KEY``; local servers may go without."""
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url is None:
        raise ConfigError("no API key: pass api_key or set OPENAI_API_KEY")
    return "no-key"


def _endpoint_label(base_url: str | None) -> str:
    if not base_url:
        return "api.openai.com"
    parts = urlsplit(base_url)
    # host and path only: never userinfo or query, where keys sometimes hide
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.hostname or ''}{port}{parts.path.rstrip('/')}"


def _rebuild(arguments: Mapping[str, Any]) -> OpenAIChat:
    return OpenAIChat(**arguments)


class OpenAIChat:
    """An OpenAI-compatible chat model; implements `engine.ChatModel`.

    Parameters:
        base_url: the API root (``http://127.0.0.1:8080/v1``); default OpenAI's.
        api_key: the key; default ``$OPENAI_API_KEY``.  A custom ``base_url`` may go
            without one (local servers); OpenAI itself may not.
        limits: the endpoint's `Limits` (picked up by `engine.Endpoint`); also sizes
            the connection pool.
        timeout: seconds for one HTTP request (connect is capped at 5 s).  The engine's
            `RetryPolicy.timeout` bounds the whole attempt as well.
        name: label for events and errors; default the host of ``base_url``.
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        limits: Limits | None = None,
        timeout: float = 120.0,
        name: str | None = None,
    ) -> None:
        key = resolve_api_key(api_key, base_url)
        # what __reduce__ rebuilds this object from in another process
        self._arguments = {
            "base_url": base_url,
            "api_key": api_key,
            "limits": limits,
            "timeout": timeout,
            "name": name,
        }
        self.limits = limits
        self.name = name or _endpoint_label(base_url)
        pool = limits.concurrency if limits is not None else 32
        self._http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=pool, max_keepalive_connections=pool),
            timeout=httpx2.Timeout(timeout, connect=min(5.0, timeout)),
        )
        self._client = openai.AsyncOpenAI(
            api_key=key, base_url=base_url, max_retries=0, http_client=self._http, timeout=timeout
        )
        # the best structured-output mode this endpoint accepted (learned on failure)
        self._format_mode = "json_schema"

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its constructor arguments (a cluster worker gets its own client
        and connection pool; no live session crosses processes).  An ``api_key`` given
        explicitly travels with it; one read from ``$OPENAI_API_KEY`` is read again
        where it is unpickled.  The structured-output mode learned so far goes along, so
        both sides send (and cache under) the same response format."""
        return (_rebuild, (self._arguments,), {"_format_mode": self._format_mode})

    @property
    def format_mode(self) -> str:
        """``json_schema``, ``json_object`` or ``text``: what this endpoint supports."""
        return self._format_mode

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.close()

    def _response_format(self, requested: Any) -> Any:
        if not isinstance(requested, Mapping) or requested.get("type") != "json_schema":
            return requested
        if self._format_mode == "json_schema":
            return dict(requested)
        if self._format_mode == "json_object":
            schema = (requested.get("json_schema") or {}).get("schema")
            return {"type": "json_object", **({"schema": schema} if schema else {})}
        return None  # plain text; the caller parses defensively

    def _downgrade_format(self, exc: openai.APIStatusError, requested: Any) -> bool:
        """If the server rejected our structured-output mode, step down the ladder."""
        if not isinstance(requested, Mapping) or requested.get("type") != "json_schema":
            return False
        text = f"{exc.message} {exc.body}".lower()
        if "response_format" not in text and "schema" not in text and "json" not in text:
            return False
        index = _FORMAT_LADDER.index(self._format_mode)
        if index + 1 >= len(_FORMAT_LADDER):
            return False
        self._format_mode = _FORMAT_LADDER[index + 1]
        return True

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        requested = params.pop("response_format", None)
        response_format = self._response_format(requested)
        if response_format is not None:
            params["response_format"] = response_format
        try:
            # The SDK's generic POST: its auth, base URL, headers and error classes, but
            # not the typed-request transform (a recursive walk over every message that
            # cost about a fifth of the client's CPU per call); the body is plain JSON.
            response = await self._client.post(
                "/chat/completions",
                body={"messages": [dict(m) for m in messages], **params},
                cast_to=httpx2.Response,
            )
        except openai.APIStatusError as exc:
            if exc.status_code in (400, 422, 500) and self._downgrade_format(exc, requested):
                raise TransientError(
                    f"endpoint rejected response_format; falling back to {self._format_mode}",
                    endpoint=self.name,
                    status=exc.status_code,
                ) from exc
            raise self._translate_status(exc) from exc
        except openai.APITimeoutError as exc:
            raise CallTimeoutError("the HTTP request timed out", endpoint=self.name) from exc
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            raise TransientError(
                f"connection failed: {type(cause).__name__}", endpoint=self.name
            ) from exc
        return self._completion(response)

    def _translate_status(self, exc: openai.APIStatusError) -> Exception:
        status = exc.status_code
        detail = exc.message
        if status == 429:
            return RateLimitedError(
                detail, retry_after=parse_retry_after(exc.response.headers), endpoint=self.name
            )
        if status in (401, 403):
            return AuthenticationError(
                "the endpoint rejected the credentials", endpoint=self.name, status=status
            )
        if status in (408, 409, 425) or status >= 500:
            return TransientError(detail, endpoint=self.name, status=status)
        if status in (400, 404, 413, 422):
            return BadRequestError(detail, endpoint=self.name, status=status)
        return PermanentError(detail, endpoint=self.name, status=status)

    def _completion(self, response: httpx2.Response) -> Completion:
        try:
            body = json.loads(response.text)
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            usage = body.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise TransientError(
                f"malformed response body ({type(exc).__name__})",
                endpoint=self.name,
                status=response.status_code,
            ) from exc
        if not isinstance(text, str):
            raise TransientError(
                "malformed response body (content is not text)", endpoint=self.name
            )
        return Completion(
            text=text,
            usage=Usage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            ),
            model=body.get("model"),
            finish_reason=choice.get("finish_reason"),
            rate_limits=parse_rate_limits(response.headers),
        )

    def __repr__(self) -> str:
        return f"<OpenAIChat {self.name!r} format={self._format_mode}>"
