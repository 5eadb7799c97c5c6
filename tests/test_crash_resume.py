"""Crash safety: kill -9 a real CLI process mid-run, rerun, pay only for what was lost.

The simulated provider runs in this test process and counts paid requests, so the
bound is checked on the provider's side.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.simulated_server import ServerConfig, SimulatedServer

ROOT = Path(__file__).resolve().parents[1]
N = 2000
CONCURRENCY = 16

pytestmark = pytest.mark.slow


def write_run(folder: Path, base_url: str, *, rpm: int | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "data.jsonl").open("w") as handle:
        for i in range(N):
            handle.write(
                json.dumps({"id": f"r{i}", "question": f"row {i}", "expected": f"row {i}"}) + "\n"
            )
    limits = f"rpm = {rpm}, concurrency = {CONCURRENCY}" if rpm else f"concurrency = {CONCURRENCY}"
    (folder / "run.toml").write_text(
        f"""
[prompt]
messages = [{{ role = "system", content = "Echo." }}, {{ role = "user", content = "{{question}}" }}]
model = "sim"

[data]
train = "data.jsonl"

[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{base_url}" }}
limits = {{ {limits} }}

[cache]
path = "cache.sqlite"

[output]
dir = "out"
"""
    )
    return folder / "run.toml"


def evaluate_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "engine", "evaluate", str(run), "--quiet"]


def outputs(run: Path) -> dict[str, tuple[str, float]]:
    lines = (run.parent / "out" / "evaluation_train.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return {r["id"]: (r["prediction"], r["result"]["score"]) for r in rows}


def test_kill_9_mid_evaluation_then_rerun_pays_only_for_the_in_flight(tmp_path: Path) -> None:
    with SimulatedServer(ServerConfig(latency_median=0.02, latency_sigma=0.3)) as server:
        run = write_run(tmp_path / "crash", server.base_url, rpm=6000)
        proc = subprocess.Popen(
            evaluate_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while server.stats.paid < N // 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # reaps it and closes the pipes
        paid_before = server.stats.paid
        assert paid_before < N

        rerun = subprocess.run(
            evaluate_cmd(run), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert summary["completed"] == N and summary["errors"] == 0
        assert server.stats.paid <= N + CONCURRENCY
        assert summary["cache_hits"] >= paid_before - CONCURRENCY

    with SimulatedServer(ServerConfig()) as clean:
        reference = write_run(tmp_path / "clean", clean.base_url, rpm=None)
        done = subprocess.run(
            evaluate_cmd(reference), cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
    assert outputs(run) == outputs(reference)
    assert len(outputs(run)) == N


def write_optimize_run(folder: Path, base_url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("prompt.json", "arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        (folder / name).write_text((ROOT / "examples" / name).read_text())
    (folder / "run.toml").write_text(
        f"""
[prompt]
file = "prompt.json"
model = "demo"
temperature = 0.0

[data]
train = "arithmetic_train.jsonl"
val = "arithmetic_val.jsonl"
expected = "answer"

[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{base_url}" }}
limits = {{ rpm = 1200, concurrency = {CONCURRENCY} }}

[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{base_url}" }}
model_name = "coach"
limits = {{ concurrency = 4 }}

[cache]
path = "cache.sqlite"

[output]
dir = "out"
"""
    )
    return folder / "run.toml"


def optimize_cmd(run: Path) -> list[str]:
    return [sys.executable, "-m", "engine", "optimize", str(run), "--quiet"]


def test_kill_9_mid_optimize_then_rerun_reaches_the_same_result(tmp_path: Path) -> None:
    from .support import demo_answer

    with SimulatedServer(ServerConfig(answer=demo_answer, latency_median=0.01)) as clean:
        reference = write_optimize_run(tmp_path / "clean", clean.base_url)
        done = subprocess.run(
            optimize_cmd(reference), cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
        uninterrupted = clean.stats.paid

    with SimulatedServer(ServerConfig(answer=demo_answer, latency_median=0.01)) as server:
        run = write_optimize_run(tmp_path / "crash", server.base_url)
        proc = subprocess.Popen(
            optimize_cmd(run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while server.stats.paid < uninterrupted // 2:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # reaps it and closes the pipes
        rerun = subprocess.run(
            optimize_cmd(run), cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert rerun.returncode == 0, rerun.stderr
        total_paid = server.stats.paid

    assert total_paid <= uninterrupted + CONCURRENCY + 4  # task + optimizer calls in flight
    best = json.loads((run.parent / "out" / "best_prompt.json").read_text())
    assert best == json.loads((reference.parent / "out" / "best_prompt.json").read_text())
    crashed_report = json.loads((run.parent / "out" / "report.json").read_text())
    reference_report = json.loads((reference.parent / "out" / "report.json").read_text())
    assert crashed_report["best_score"] == reference_report["best_score"]
    assert [s["batch_ids"] for s in crashed_report["steps"]] == [
        s["batch_ids"] for s in reference_report["steps"]
    ]
    assert [
        (p["reason"], p["full_score"]) for s in crashed_report["steps"] for p in s["proposals"]
    ] == [(p["reason"], p["full_score"]) for s in reference_report["steps"] for p in s["proposals"]]
