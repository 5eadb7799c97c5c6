"""The simulated provider's Batch API: ``/v1/files`` and ``/v1/batches``.

Files are kept in memory.  A batch "runs" for ``batch_delay`` seconds after creation,
then completes: each JSONL line is answered with the provider's answer function into
the output file, except a ``batch_failure_rate`` share that lands in the error file.
With ``batch_expire`` the batch ends ``expired`` with only the first half answered and
the rest reported as ``batch_expired`` in the error file, as OpenAI does.  A
``null_content_rate`` share is answered without text (see `adapters._fake`), as the
chat route does.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import _fake

__all__ = ["BatchService", "BatchStats"]

Answer = Callable[[Sequence[Mapping[str, Any]], Mapping[str, Any]], str]


@dataclass
class BatchStats:
    uploads: int = 0
    batches: int = 0
    lines: int = 0
    answered: int = 0
    null_contents: int = 0
    failed: int = 0
    expired: int = 0
    polls: int = 0


@dataclass
class _Batch:
    id: str
    input_file_id: str
    created: float
    status: str = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "completed": 0, "failed": 0}
    )


class BatchService:
    """The routes and state of the simulated Batch API."""

    def __init__(
        self,
        answer: Answer,
        *,
        delay: float = 0.5,
        failure_rate: float = 0.0,
        expire: bool = False,
        seed: int = 0,
        null_content_rate: float = 0.0,
        null_content_kind: str = "refusal",
    ) -> None:
        self.answer = answer
        self.null_content_rate = null_content_rate
        self.null_content_kind = null_content_kind
        self.delay = delay
        self.failure_rate = failure_rate
        self.expire = expire
        self.rng = random.Random(seed)
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, _Batch] = {}
        self.stats = BatchStats()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files/{file_id}/content", self.content, methods=["GET"]),
            Route("/v1/batches", self.create, methods=["POST"]),
            Route("/v1/batches/{batch_id}", self.retrieve, methods=["GET"]),
        ]

    async def upload(self, request: Request) -> Response:
        # closing the form closes its spooled temporary files
        async with request.form() as form:
            upload = form.get("file")
            if form.get("purpose") != "batch" or upload is None or isinstance(upload, str):
                return JSONResponse(
                    {"error": {"message": "purpose=batch and a file are required"}}, 400
                )
            data = await upload.read()
            filename = upload.filename
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = data
        self.stats.uploads += 1
        return JSONResponse(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "purpose": "batch",
                "filename": filename,
                "created_at": int(time.time()),
                "status": "processed",
            }
        )

    async def content(self, request: Request) -> Response:
        data = self.files.get(request.path_params["file_id"])
        if data is None:
            return JSONResponse({"error": {"message": "no such file"}}, 404)
        return Response(data, media_type="application/jsonl")

    async def create(self, request: Request) -> Response:
        body = await request.json()
        if body.get("completion_window") != "24h" or body.get("endpoint") != "/v1/chat/completions":
            return JSONResponse({"error": {"message": "unsupported endpoint or window"}}, 400)
        if body.get("input_file_id") not in self.files:
            return JSONResponse({"error": {"message": "no such input file"}}, 400)
        batch = _Batch(f"batch_{uuid.uuid4().hex[:16]}", body["input_file_id"], time.monotonic())
        self.batches[batch.id] = batch
        self.stats.batches += 1
        return JSONResponse(self._view(batch))

    async def retrieve(self, request: Request) -> Response:
        batch = self.batches.get(request.path_params["batch_id"])
        if batch is None:
            return JSONResponse({"error": {"message": "no such batch"}}, 404)
        self.stats.polls += 1
        if batch.status in ("validating", "in_progress"):
            if time.monotonic() - batch.created >= self.delay:
                self._run(batch)
            else:
                batch.status = "in_progress"
        return JSONResponse(self._view(batch))

    def _run(self, batch: _Batch) -> None:
        lines = [
            json.loads(line)
            for line in self.files[batch.input_file_id].splitlines()
            if line.strip()
        ]
        outputs, errors = [], []
        cutoff = len(lines) // 2 if self.expire else len(lines)
        for index, line in enumerate(lines):
            self.stats.lines += 1
            if index >= cutoff:
                self.stats.expired += 1
                errors.append(_expired(index, line["custom_id"]))
                continue
            roll = self.rng.random()  # one draw per line: seeded runs stay comparable
            if roll < self.failure_rate:
                self.stats.failed += 1
                errors.append(_failed(index, line["custom_id"]))
                continue
            outputs.append(self._answer(index, line, roll - self.failure_rate))
        batch.output_file_id = self._store(outputs)
        batch.error_file_id = self._store(errors) if errors else None
        batch.status = "expired" if self.expire else "completed"
        batch.counts = {"total": len(lines), "completed": len(outputs), "failed": len(errors)}

    def _answer(self, index: int, line: dict[str, Any], roll: float) -> dict[str, Any]:
        body = line["body"]
        null = 0 <= roll < self.null_content_rate
        if null:
            self.stats.null_contents += 1
        self.stats.answered += 1
        completion = _fake.completion_body(
            f"chatcmpl-b{index}",
            body,
            self.answer(body["messages"], body),
            null_content=self.null_content_kind if null else None,
        )
        return {
            "id": f"batch_req_{index}",
            "custom_id": line["custom_id"],
            "error": None,
            "response": {"status_code": 200, "body": completion},
        }

    def _store(self, rows: list[dict[str, Any]]) -> str:
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        self.files[file_id] = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return file_id

    @staticmethod
    def _view(batch: _Batch) -> dict[str, Any]:
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(time.time()),
            "request_counts": batch.counts,
        }


def _expired(index: int, custom_id: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{index}",
        "custom_id": custom_id,
        "response": None,
        "error": {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        },
    }


def _failed(index: int, custom_id: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{index}",
        "custom_id": custom_id,
        "response": {
            "status_code": 500,
            "body": {"error": {"message": "injected batch item failure"}},
        },
        "error": None,
    }
