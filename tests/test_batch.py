"""The Batch API flow against the simulated provider over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.openai_batch import OpenAIBatch
from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import Cache, Endpoint, Limits, evaluate
from engine.metrics import ExactMatch

from .conftest import echo_examples, qa_prompt


async def _run(config: ServerConfig, tmp_path: Path, n: int = 50, **batch_options: object) -> tuple:
    data = echo_examples(n)
    async with SimulatedServer(config) as server:
        async with (
            OpenAIBatch(base_url=server.base_url, poll_interval=0.05, **batch_options) as batch,
            Cache.sqlite(str(tmp_path / "c.sqlite")) as cache,
        ):  # type: ignore[arg-type]
            async with OpenAIChat(base_url=server.base_url, limits=Limits(concurrency=8)) as chat:
                # each run has a server on a new port: one namespace shares the cache
                # across them on purpose (a base URL is otherwise part of every key)
                endpoint = Endpoint(chat, namespace="simulated-provider")
                report = await batch.prefill(qa_prompt(), data, cache=cache, model=endpoint)
                result = await evaluate(
                    qa_prompt(), data, model=endpoint, metric=ExactMatch(), cache=cache
                )
    return report, result, server


async def test_batch_fills_the_cache_and_failed_items_go_through_the_normal_path(
    tmp_path: Path,
) -> None:
    config = ServerConfig(batch_delay=0.2, batch_failure_rate=0.2, seed=4)
    report, result, server = await _run(config, tmp_path)
    assert report.submitted == 50 and report.failed > 0 and report.filled == 50 - report.failed
    assert all(reason.startswith("HTTP 500") for reason in report.failures.values())
    assert server.batches.stats.polls >= 2  # it really waited for the batch
    # exactly the failed items were paid through the normal path, then everything scored
    assert server.stats.paid == report.failed == result.calls
    assert result.completed == 50 and result.errors == 0 and result.score == 1.0
    assert result.cache_hits == report.filled


async def test_expired_batch_is_reported_and_completed_normally(tmp_path: Path) -> None:
    report, result, server = await _run(ServerConfig(batch_delay=0.1, batch_expire=True), tmp_path)
    assert report.statuses == {report.batches[0]: "expired"}
    assert report.expired == 25 and report.filled == 25
    assert set(report.failures.values()) == {"expired"}
    assert server.stats.paid == 25 and result.score == 1.0 and result.completed == 50


async def test_jobs_split_over_per_file_limits_and_skip_cached(tmp_path: Path) -> None:
    report, result, server = await _run(
        ServerConfig(batch_delay=0.0), tmp_path, max_requests_per_file=20
    )
    assert len(report.batches) == 3 and server.batches.stats.uploads == 3
    assert report.filled == 50 and server.stats.paid == 0 and result.calls == 0
    # a second prefill over the same cache has nothing to submit
    report2, _, server2 = await _run(
        ServerConfig(batch_delay=0.0), tmp_path, max_requests_per_file=20
    )
    assert (
        report2.already_cached == 50
        and report2.submitted == 0
        and server2.batches.stats.uploads == 0
    )


def test_batch_lines_follow_the_batch_api_shape() -> None:
    batch = OpenAIBatch(
        base_url="http://127.0.0.1:1/v1", max_requests_per_file=2, max_bytes_per_file=2048
    )
    chunks = batch._chunks([b"x" * 700 + b"\n"] * 5)
    assert [len(c) for c in chunks] == [2, 2, 1]
    with pytest.raises(Exception, match="over the file limit"):
        batch._chunks([b"x" * 5000])


def test_cli_evaluate_with_a_batch_section(tmp_path: Path) -> None:
    """`evaluate` with [batch]: bulk first, the failed items through [model], one output."""
    with SimulatedServer(ServerConfig(batch_delay=0.1, batch_failure_rate=0.1, seed=2)) as server:
        with (tmp_path / "data.jsonl").open("w") as handle:
            for i in range(30):
                handle.write(
                    json.dumps({"id": f"b{i}", "question": f"q{i}", "expected": f"q{i}"}) + "\n"
                )
        (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "sim"
[data]
train = "data.jsonl"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{server.base_url}" }}
[batch]
adapter = "adapters.openai_batch:OpenAIBatch"
options = {{ base_url = "{server.base_url}", poll_interval = 0.05 }}
[cache]
path = "cache.sqlite"
[output]
dir = "out"
""")
        done = subprocess.run(
            [sys.executable, "-m", "engine", "evaluate", str(tmp_path / "run.toml"), "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parents[1],
        )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["completed"] == 30 and summary["score"] == 1.0
    failed = server.batches.stats.failed
    assert server.batches.stats.batches == 1 and server.stats.paid == failed == summary["calls"]
    assert f"batch: {30 - failed} of 30 filled" in done.stderr
