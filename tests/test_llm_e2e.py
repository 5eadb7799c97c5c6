"""End to end against a real local LLM (llama.cpp server, Gemma 3 270M).

Start it with ``scripts/llm_server.sh start`` and set ``LLM_BASE_URL`` (``.ci/run`` does
both).  A 270M base model often answers nonsense: these tests assert the engine
survives and reports it (every example has an outcome, invalid proposals recorded with
their raw text, no crash), not that the score rises.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.openai_chat import OpenAIChat
from engine import Endpoint, Example, Limits, Prompt, RetryPolicy, evaluate, optimize
from engine.metrics import Contains

BASE_URL = os.environ.get("LLM_BASE_URL")
pytestmark = [
    pytest.mark.llm,
    pytest.mark.slow,
    pytest.mark.skipif(not BASE_URL, reason="set LLM_BASE_URL (scripts/llm_server.sh start)"),
]

MODEL = "gemma-3-270m"
DATA = [
    Example({"country": "France"}, "Paris", id="fr"),
    Example({"country": "Japan"}, "Tokyo", id="jp"),
    Example({"country": "Italy"}, "Rome", id="it"),
    Example({"country": "Egypt"}, "Cairo", id="eg"),
]


def prompt() -> Prompt:
    return Prompt(
        [{"role": "user", "content": "What is the capital of {country}? Answer with one word."}],
        model=MODEL,
        temperature=0.0,
        params={"max_tokens": 24},
    )


def endpoint(chat: OpenAIChat) -> Endpoint:
    # llama-cpp-python's server answers one request at a time
    return Endpoint(
        chat, limits=Limits(concurrency=1), retry=RetryPolicy(max_attempts=3, timeout=120)
    )


async def test_evaluate_against_the_real_llm() -> None:
    async with OpenAIChat(base_url=BASE_URL) as chat:
        result = await evaluate(prompt(), DATA, model=endpoint(chat), metric=Contains())
    assert result.completed == len(DATA) == len(result.outcomes)
    for outcome in result.outcomes:
        assert (outcome.result is None) != (outcome.error is None)
        if outcome.result is not None:
            assert isinstance(outcome.prediction, str)
    assert result.calls >= len(DATA)


async def test_short_optimize_survives_the_real_llm() -> None:
    async with OpenAIChat(base_url=BASE_URL) as chat:
        ep = endpoint(chat)
        result = await optimize(
            prompt(),
            DATA,
            metric=Contains(),
            model=ep,
            optimizer_model=ep,
            optimizer_model_name=MODEL,
            batch_size=4,
            max_proposals_per_step=2,
        )
    report = result.report
    assert report.task_description and report.metric_description
    assert len(report.steps) == 1 and report.stopped_reason
    assert result.prompt.placeholders == {"country"}
    # conservative scores are never NaN: an errored example counts as a failure
    assert not math.isnan(report.initial_score) and result.score >= report.initial_score
    for proposal in report.proposals:
        assert proposal.reason
        if proposal.reason.startswith("invalid"):
            assert proposal.raw is not None or "apply call failed" in proposal.reason
    if report.proposals:
        assert chat.format_mode in {"json_object", "text"}  # json_schema got HTTP 500


# -- the run file a user would write, through the command line (issue #26) ------------

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _user_run_file(tmp_path: Path) -> Path:
    """The demo task pointed at the local server the way the README says: a max_tokens
    on the prompt, concurrency 4, nothing tuned to this server."""
    run = tmp_path / "local.toml"
    run.write_text(
        f"""
[prompt]
file = "{EXAMPLES / "prompt.json"}"
model = "{MODEL}"
temperature = 0.0
params = {{ max_tokens = 32 }}

[data]
train = "{EXAMPLES / "arithmetic_train.jsonl"}"
expected = "answer"
id = "id"

[metric]
use = "engine.metrics:ExactMatch"

[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{BASE_URL}" }}
limits = {{ concurrency = 4 }}

[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{BASE_URL}" }}
model_name = "{MODEL}"
limits = {{ concurrency = 4 }}

[trainer]
batch_size = 4
seed = 42

[output]
dir = "{tmp_path / "out"}"
"""
    )
    return run


@pytest.mark.timeout(960)
def test_the_demo_run_file_finishes_an_evaluation_and_a_step_on_the_local_llm(
    tmp_path: Path,
) -> None:
    """``python -m engine optimize`` on the demo task against the local llama.cpp server
    (one request at a time) with the user's run file: the first full evaluation and one
    step finish within 15 minutes with no errored example and no timed-out call (479 s
    and 584 s measured on a loaded 2-core machine: benchmarks/RESULTS_local.md).  The
    run is stopped (SIGTERM, which the CLI treats as Ctrl-C) after its first step: the other nine would say nothing new."""
    events: list[dict[str, object]] = []
    deadline = time.monotonic() + 900
    with subprocess.Popen(
        [sys.executable, "-m", "engine", "optimize", str(_user_run_file(tmp_path)), "--json-logs"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stderr is not None
            for line in process.stderr:
                if line.startswith("{"):
                    events.append(json.loads(line))
                if events and events[-1].get("event") == "optimize.step":
                    break
                assert time.monotonic() < deadline, "no step within 15 minutes"
        finally:
            process.send_signal(signal.SIGTERM)  # as Ctrl-C; SIGINT may be ignored in CI
            process.communicate(timeout=60)  # drains stderr, so the exit is not blocked
    names = [e.get("event") for e in events]
    assert "optimize.step" in names, names[-20:]
    finished = [e for e in events if e.get("event") == "evaluation.finished"]
    assert finished and finished[0]["total"] == 40 and finished[0]["done"] == 40
    assert all(e["errors"] == 0 and e["timeouts"] == 0 for e in finished), finished
