"""The simulated provider's Anthropic Message Batches API: ``/v1/messages/batches``.

A batch "runs" for ``batch_delay`` seconds after creation, then ends: each request is
answered with the server's answer function, except a ``batch_failure_rate`` share that
ends ``errored``; with ``batch_expire`` the second half ends ``expired``.  A
``null_content_rate`` share is answered with ``stop_reason: refusal``, as the chat route
does.  Results are JSONL at the batch's ``results_url``.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ._simulated_anthropic import AnthropicDialect

__all__ = ["AnthropicBatchService", "AnthropicBatchStats"]


@dataclass
class AnthropicBatchStats:
    batches: int = 0
    requests: int = 0
    answered: int = 0
    null_contents: int = 0
    errored: int = 0
    expired: int = 0
    polls: int = 0


@dataclass
class _Batch:
    id: str
    requests: list[dict[str, Any]]
    created: float
    status: str = "in_progress"
    results: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicBatchService:
    """The routes and state of the simulated Message Batches API."""

    def __init__(self, config: Any) -> None:
        self.config = config  # a ServerConfig: answer, batch_* and null_content_rate
        self.rng = random.Random(config.seed)
        self.dialect = AnthropicDialect()
        self.batches: dict[str, _Batch] = {}
        self.stats = AnthropicBatchStats()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages/batches", self.create, methods=["POST"]),
            Route("/v1/messages/batches/{batch_id}", self.retrieve, methods=["GET"]),
            Route("/v1/messages/batches/{batch_id}/results", self.results, methods=["GET"]),
        ]

    async def create(self, request: Request) -> Response:
        if not self.dialect.authorized(request.headers, self.config.api_key):
            return JSONResponse(_error("authentication_error", "invalid x-api-key"), 401)
        body = await request.json()
        items = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            return JSONResponse(_error("invalid_request_error", "requests: required"), 400)
        for item in items:
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(item.get("custom_id"), str) or not isinstance(params, dict):
                return JSONResponse(_error("invalid_request_error", "custom_id, params"), 400)
        batch = _Batch(f"msgbatch_{uuid.uuid4().hex[:16]}", items, time.monotonic())
        self.batches[batch.id] = batch
        self.stats.batches += 1
        return JSONResponse(self._view(batch, request))

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return JSONResponse(_error("not_found_error", "no such batch"), 404)
        self.stats.polls += 1
        if batch.status == "in_progress" and time.monotonic() - batch.created >= (
            self.config.batch_delay
        ):
            self._run(batch)
        return JSONResponse(self._view(batch, request))

    async def results(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None or batch.status != "ended":
            return JSONResponse(_error("not_found_error", "no results yet"), 404)
        text = "".join(json.dumps(r) + "\n" for r in batch.results)
        return Response(text, media_type="application/x-jsonl")

    def _run(self, batch: _Batch) -> None:
        c = self.config
        cutoff = len(batch.requests) // 2 if c.batch_expire else len(batch.requests)
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for index, item in enumerate(batch.requests):
            self.stats.requests += 1
            roll = self.rng.random()  # one draw per request: seeded runs stay comparable
            if index >= cutoff:
                result: dict[str, Any] = {"type": "expired"}
            elif roll < c.batch_failure_rate:
                error = _error("api_error", "injected batch item failure")
                result = {"type": "errored", "error": error}
            else:
                result = {"type": "succeeded", "message": self._answer(index, item, roll)}
            counts[result["type"]] += 1
            batch.results.append({"custom_id": item["custom_id"], "result": result})
        self.stats.answered += counts["succeeded"]
        self.stats.errored += counts["errored"]
        self.stats.expired += counts["expired"]
        batch.status, batch.counts = "ended", counts

    def _answer(self, index: int, item: dict[str, Any], roll: float) -> dict[str, Any]:
        body = self.dialect.parse(json.dumps(item["params"]).encode(), {})
        if body is None:
            raise ValueError("a batch request without messages or max_tokens")
        null = 0 <= roll - self.config.batch_failure_rate < self.config.null_content_rate
        self.stats.null_contents += null
        text = self.config.answer(body["messages"], body)
        return self.dialect.answer(body, text, f"b{index:011d}", null)[0]

    @staticmethod
    def _view(batch: _Batch, request: Request) -> dict[str, Any]:
        ended = batch.status == "ended"
        root = str(request.base_url).rstrip("/")
        counts = batch.counts or {"processing": len(batch.requests)}
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": counts,
            "results_url": f"{root}/v1/messages/batches/{batch.id}/results" if ended else None,
        }
