"""`OpenAIBatch`: fill the prediction cache through the OpenAI Batch API (half price).

For bulk offline evaluation: the cache misses of (prompt, examples) are written as
JSONL requests whose ``custom_id`` is the cache key, uploaded (``POST /v1/files``,
purpose ``batch``), submitted (``POST /v1/batches``, window ``24h``), polled with
backoff, and the output file's answers stored in the cache.  Failed and expired items
stay misses, so the ordinary `engine.evaluate` that follows pays for exactly those
through the normal, rate-limited path; the report says which and why.

Usage::

    async with OpenAIBatch(base_url=url) as batch, Cache.sqlite("c.sqlite") as cache:
        report = await batch.prefill(prompt, examples, cache=cache, model=chat)
        result = await evaluate(prompt, examples, model=chat, metric=metric, cache=cache)

Requests are split over the API's per-file limits (50,000 requests, 200 MB).  Batch
items have their own queued-token quota, outside RPM/TPM, so the engine's limiter is
not involved here; the few control-plane calls use the SDK's own retries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import anyio
import httpx2
import openai

from engine import (
    AsyncCloseable,
    Cache,
    ChatModel,
    Completion,
    ConfigError,
    ConnectionFailedError,
    Endpoint,
    Example,
    Prompt,
    ProviderError,
    TransientError,
    register_secret,
)

from ._batch_report import BatchReport, poll_until_ended, split_batches
from ._http import connect_failure_reason
from ._route import openai_route
from ._wire import parse_completion, translate_status

__all__ = ["BatchReport", "OpenAIBatch"]

MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024
_TERMINAL = {"completed", "expired", "failed", "cancelled"}


class OpenAIBatch(AsyncCloseable):
    """The Batch API of an OpenAI-compatible endpoint.

    Parameters:
        base_url, api_key: as for `OpenAIChat` (key from ``$OPENAI_API_KEY``).
        poll_interval: first wait between status polls, seconds; grows 1.5x per poll.
        max_poll_interval: cap of that wait.
        max_requests_per_file, max_bytes_per_file: split limits (the API's by default).
        deadline: give up polling after this many seconds (items stay misses).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        poll_interval: float = 30.0,
        max_poll_interval: float = 600.0,
        max_requests_per_file: int = MAX_REQUESTS_PER_FILE,
        max_bytes_per_file: int = MAX_BYTES_PER_FILE,
        deadline: float | None = None,
        timeout: float = 300.0,
    ) -> None:
        route = openai_route(base_url=base_url, api_key=api_key)
        self.name = f"{route.label} (Batch API)"
        self._display = route.display
        self._secrets = route.secrets
        for secret in route.secrets:  # redacted by value wherever the engine writes text
            register_secret(secret)
        if max_requests_per_file < 1 or max_bytes_per_file < 1024:
            raise ConfigError("per-file limits must allow at least one request")
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_requests_per_file = min(max_requests_per_file, MAX_REQUESTS_PER_FILE)
        self.max_bytes_per_file = min(max_bytes_per_file, MAX_BYTES_PER_FILE)
        self.deadline = deadline
        self._http = httpx2.AsyncClient(timeout=httpx2.Timeout(timeout, connect=5.0))
        self._client = openai.AsyncOpenAI(
            api_key=route.api_key, base_url=route.base_url, http_client=self._http, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _chunks(self, lines: Iterable[bytes]) -> list[list[bytes]]:
        """``lines`` cut into files within the per-file limits."""
        return split_batches(
            ((line, len(line)) for line in lines),
            max_requests=self.max_requests_per_file,
            max_bytes=self.max_bytes_per_file,
            unit="file",
        )

    async def prefill(
        self,
        prompt: Prompt,
        examples: Sequence[Example],
        *,
        cache: Cache,
        model: ChatModel | Endpoint,
    ) -> BatchReport:
        """Put predictions for every cache miss of ``examples`` into ``cache``, under the
        keys ``model`` (the chat endpoint the evaluation that follows will use) reads:
        the same question, answered in bulk at half price."""
        report = BatchReport()
        by_key: dict[str, Example] = {}
        lines: list[bytes] = []
        request = Endpoint.of(model).request_key(prompt)
        params = prompt.request_params()
        for example in await report.misses(examples, cache=cache, request=request):
            key = cache.prediction_key(request, example)
            by_key[key] = example
            body = {**params, "messages": prompt.render(example.inputs)}
            line = {
                "custom_id": key,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": body,
            }
            lines.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
        report.submitted = len(lines)
        if not lines:
            return report

        try:
            batch_ids = [await self._submit(chunk) for chunk in self._chunks(lines)]
            report.batches = batch_ids
            async with anyio.create_task_group() as tg:
                for batch_id in batch_ids:
                    tg.start_soon(self._collect, batch_id, request, by_key, cache, report)
        except openai.APIError as exc:
            raise self._translate(exc) from exc
        except ExceptionGroup as group:  # a poll or download inside the task group failed
            failed, _ = group.split(openai.APIError)
            if failed is None:
                raise
            first = failed.exceptions[0]
            while isinstance(first, ExceptionGroup):
                first = first.exceptions[0]
            raise self._translate(first) from group
        return report

    def _translate(self, exc: openai.APIError) -> ProviderError:
        """The engine's error for a failed control-plane call (the same table as chat)."""
        if isinstance(exc, openai.APIStatusError):
            response = exc.response
            return translate_status(
                response.status_code,
                response.headers,
                response.content,
                endpoint=self.name,
                secrets=self._secrets,
            )
        cause = exc.__cause__
        if isinstance(cause, httpx2.ConnectError | httpx2.ConnectTimeout):
            reason = connect_failure_reason(cause)
            return ConnectionFailedError(
                f"cannot reach {self._display}: {reason}", endpoint=self.name
            )
        return TransientError(f"Batch API call failed: {type(exc).__name__}", endpoint=self.name)

    async def _submit(self, chunk: list[bytes]) -> str:
        upload = await self._client.files.create(
            file=("batch.jsonl", b"".join(chunk)), purpose="batch"
        )
        batch = await self._client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        return str(batch.id)

    async def _collect(
        self,
        batch_id: str,
        request: str,
        by_key: dict[str, Example],
        cache: Cache,
        report: BatchReport,
    ) -> None:
        batch = await poll_until_ended(
            lambda: self._client.batches.retrieve(batch_id),
            lambda batch: str(batch.status),
            lambda status: status in _TERMINAL,
            interval=self.poll_interval,
            max_interval=self.max_poll_interval,
            deadline=self.deadline,
            report=report,
            batch_id=batch_id,
        )
        if batch is None:
            return
        if batch.output_file_id:
            content = await self._client.files.content(batch.output_file_id)
            for row in _jsonl(content.text):
                await self._fill(row, request, by_key, cache, report)
        if batch.error_file_id:
            content = await self._client.files.content(batch.error_file_id)
            for row in _jsonl(content.text):
                example = by_key.get(str(row.get("custom_id")))
                if example is None:
                    continue
                error = row.get("error") or {}
                if error.get("code") == "batch_expired":
                    report.expire(example)
                else:
                    report.fail(example, _reason(row))

    async def _fill(
        self,
        row: dict[str, Any],
        request: str,
        by_key: dict[str, Example],
        cache: Cache,
        report: BatchReport,
    ) -> None:
        example = by_key.get(str(row.get("custom_id")))
        if example is None:
            return
        response = row.get("response") or {}

        def parse() -> Completion:
            if response.get("status_code") != 200:
                raise ValueError(f"status {response.get('status_code')}")
            return parse_completion(response["body"], endpoint=self.name)

        await report.fill(
            example,
            parse,
            cache=cache,
            request=request,
            unusable=(KeyError, TypeError, ValueError, TransientError),
        )


def _jsonl(text: str) -> list[dict[str, Any]]:
    rows = []
    for line in text.splitlines():
        if line.strip():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                rows.append(value)
    return rows


def _reason(row: dict[str, Any]) -> str:
    response = row.get("response") or {}
    body = response.get("body") or {}
    message = (body.get("error") or {}).get("message") or (row.get("error") or {}).get("message")
    return f"HTTP {response.get('status_code')}: {message}" if response else str(message)
