"""`AnthropicBatch`: fill the prediction cache through Anthropic's Message Batches API.

The counterpart of `OpenAIBatch` (same ``prefill``, same report, same outcome rules, so
the CLI's ``[batch]`` section takes either): the cache misses of (prompt, examples) are
sent as one or more batches (``POST /v1/messages/batches``, each request's params
encoded exactly as `AnthropicChat` sends them), polled with backoff, and the results
(JSONL at ``results_url``) stored in the cache under the keys the chat endpoint reads.
Errored, expired and refused items stay misses: the ordinary `engine.evaluate` that
follows pays for exactly those through the rate-limited path, and the report says why.

Usage::

    async with AnthropicBatch() as batch, Cache.sqlite("c.sqlite") as cache:
        report = await batch.prefill(prompt, examples, cache=cache, model=claude)
        result = await evaluate(prompt, examples, model=claude, metric=metric, cache=cache)

Batch items have their own quota (outside RPM/ITPM/OTPM); the few control-plane calls
retry 429/5xx/529 on their own with backoff (``control_attempts``).  No SDK: aiohttp.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import aiohttp
import anyio

from engine import (
    AsyncCloseable,
    Cache,
    ChatModel,
    ConfigError,
    ConnectionFailedError,
    Endpoint,
    Example,
    Prompt,
    register_secret,
)

from ._anthropic_wire import (
    API_VERSION,
    DEFAULT_MAX_TOKENS,
    encode_request,
    parse_response,
    translate_status,
)
from ._batch_report import BatchReport, poll_until_ended, split_batches
from ._native_route import native_route
from ._wire import RawResponse, encode_json, scrub
from .anthropic import ANTHROPIC

__all__ = ["AnthropicBatch", "AnthropicBatchReport"]

MAX_REQUESTS_PER_BATCH = 100_000
MAX_BYTES_PER_BATCH = 256 * 1024 * 1024


class AnthropicBatchReport(BatchReport):
    """What a `AnthropicBatch.prefill` did (the fields of `OpenAIBatch`'s report);
    ``failures`` maps example id -> reason."""


class AnthropicBatch(AsyncCloseable):
    """The Message Batches API of Anthropic (or a server speaking it).

    Parameters:
        base_url, api_key: as for `AnthropicChat` (key from ``$ANTHROPIC_API_KEY``).
        poll_interval: first wait between status polls, seconds; grows 1.5x per poll.
        max_poll_interval: cap of that wait.
        max_requests_per_batch, max_bytes_per_batch: split limits (the API's).
        deadline: give up polling after this many seconds (items stay misses).
        timeout: seconds for one control-plane request.
        control_attempts: attempts of one control-plane request (429/5xx/529, drops).
        default_max_tokens, anthropic_version: as for `AnthropicChat` (use the same).
    """

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        poll_interval: float = 30.0,
        max_poll_interval: float = 600.0,
        max_requests_per_batch: int = MAX_REQUESTS_PER_BATCH,
        max_bytes_per_batch: int = MAX_BYTES_PER_BATCH,
        deadline: float | None = None,
        timeout: float = 300.0,
        control_attempts: int = 5,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        anthropic_version: str = API_VERSION,
    ) -> None:
        self._route = native_route(
            ANTHROPIC,
            base_url=base_url,
            path="/v1/messages/batches",
            api_key=api_key,
            extra_headers={"anthropic-version": anthropic_version},
        )
        self.name = f"{self._route.label} (Message Batches API)"
        for secret in self._route.secrets:  # redacted by value wherever the engine writes
            register_secret(secret)
        if max_requests_per_batch < 1 or max_bytes_per_batch < 1024 or control_attempts < 1:
            raise ConfigError("per-batch limits and control_attempts must allow one request")
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_requests_per_batch = min(max_requests_per_batch, MAX_REQUESTS_PER_BATCH)
        self.max_bytes_per_batch = min(max_bytes_per_batch, MAX_BYTES_PER_BATCH)
        self.deadline = deadline
        self.control_attempts = control_attempts
        self.default_max_tokens = default_max_tokens
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(5.0, timeout / 2))
        self._session: aiohttp.ClientSession | None = None

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    # -- the control plane ----------------------------------------------------------------
    async def _call(self, method: str, url: str, payload: Any = None) -> RawResponse:
        """One control-plane request, retried with backoff on 429/5xx/529 and drops."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._route.headers, timeout=self._timeout
            )
        data = encode_json(payload) if payload is not None else None
        for attempt in range(1, self.control_attempts + 1):
            try:
                async with self._session.request(method, url, data=data) as response:
                    raw = RawResponse(response.status, response.headers, await response.read())
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                if attempt == self.control_attempts:
                    detail = scrub(f"{type(exc).__name__}: {exc}", self._route.secrets)
                    raise ConnectionFailedError(
                        f"cannot reach {self._route.display}: {detail}", endpoint=self.name
                    ) from exc
            else:
                if 200 <= raw.status < 300:
                    return raw
                error = translate_status(
                    raw.status,
                    raw.headers,
                    raw.body,
                    endpoint=self.name,
                    secrets=self._route.secrets,
                )
                if not error.retryable or attempt == self.control_attempts:
                    raise error
            await anyio.sleep(min(2.0**attempt, 60.0))
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- prefill ----------------------------------------------------------------------------
    async def prefill(
        self,
        prompt: Prompt,
        examples: Sequence[Example],
        *,
        cache: Cache,
        model: ChatModel | Endpoint,
    ) -> AnthropicBatchReport:
        """Put predictions for every cache miss of ``examples`` into ``cache``, under the
        keys ``model`` (the `AnthropicChat` the evaluation that follows uses) reads."""
        report = AnthropicBatchReport()
        by_id: dict[str, Example] = {}
        items: list[tuple[dict[str, Any], int]] = []
        request = Endpoint.of(model).request_key(prompt)
        params = prompt.request_params()
        for example in await report.misses(examples, cache=cache, request=request):
            custom_id = f"r{len(items)}"  # the API's ids: [a-zA-Z0-9_-]{1,64}
            by_id[custom_id] = example
            body = encode_request(
                prompt.render(example.inputs), params, default_max_tokens=self.default_max_tokens
            )
            item = {"custom_id": custom_id, "params": body}
            items.append((item, len(encode_json(item))))
        report.submitted = len(items)
        chunks = split_batches(
            items,
            max_requests=self.max_requests_per_batch,
            max_bytes=self.max_bytes_per_batch,
            unit="batch",
        )
        for chunk in chunks:
            raw = await self._call("POST", self._route.url, {"requests": chunk})
            report.batches.append(str(json.loads(raw.body)["id"]))
        for batch_id in report.batches:
            await self._collect(batch_id, request, by_id, cache, report)
        return report

    async def _collect(
        self,
        batch_id: str,
        request: str,
        by_id: dict[str, Example],
        cache: Cache,
        report: AnthropicBatchReport,
    ) -> None:
        url = f"{self._route.url.split('?', 1)[0]}/{batch_id}"

        async def fetch() -> Any:
            return json.loads((await self._call("GET", url)).body)

        batch = await poll_until_ended(
            fetch,
            lambda batch: str(batch.get("processing_status")),
            lambda status: status == "ended",
            interval=self.poll_interval,
            max_interval=self.max_poll_interval,
            deadline=self.deadline,
            report=report,
            batch_id=batch_id,
        )
        if batch is None:
            return
        results = batch.get("results_url")
        if not results:
            return
        for line in (await self._call("GET", str(results))).body.splitlines():
            row = json.loads(line) if line.strip() else None
            example = by_id.get(str(row.get("custom_id"))) if isinstance(row, dict) else None
            if example is not None and isinstance(row, dict):
                await self._fill(row.get("result") or {}, example, request, cache, report)

    async def _fill(
        self,
        result: dict[str, Any],
        example: Example,
        request: str,
        cache: Cache,
        report: AnthropicBatchReport,
    ) -> None:
        kind = result.get("type")
        if kind == "expired":
            report.expire(example)
            return
        if kind != "succeeded":
            error = (result.get("error") or {}).get("error") or {}
            report.fail(example, f"{kind}: {error.get('message') or error.get('type')}")
            return
        raw = RawResponse(200, {}, json.dumps(result.get("message")).encode())
        await report.fill(
            example, lambda: parse_response(raw, endpoint=self.name), cache=cache, request=request
        )
