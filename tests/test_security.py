"""Secrets stay out of logs, events, reports, the cache and errors; files are private."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters import arithmetic_examples
from adapters.openai_chat import OpenAIChat
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import AuthenticationError, Cache, Endpoint, RetryPolicy, optimize
from engine._redact import redact_text
from engine.metrics import ExactMatch
from engine.testing import EventRecorder, capture_logs

from .conftest import qa_prompt
from .support import demo_answer

CANARY = "sk-canary-SECRET-0123456789"
ROOT = Path(__file__).resolve().parents[1]


def test_redaction_covers_key_shapes() -> None:
    text = f"key={CANARY} Authorization: Bearer abcdefghijklmnop api_key: 'zzzzzzzzzz'"
    cleaned = redact_text(text)
    assert (
        CANARY not in cleaned and "abcdefghijklmnop" not in cleaned and "zzzzzzzzzz" not in cleaned
    )


@pytest.mark.slow
async def test_canary_key_never_leaks(tmp_path: Path) -> None:
    recorder = EventRecorder()
    async with SimulatedServer(ServerConfig(api_key=CANARY, answer=demo_answer)) as server:
        async with OpenAIChat(base_url=server.base_url, api_key=CANARY) as chat:
            with capture_logs() as logs:
                async with Cache.sqlite(str(tmp_path / "cache.sqlite")) as cache:
                    result = await optimize(
                        qa_prompt(),
                        arithmetic_examples(12),
                        metric=ExactMatch(),
                        model=chat,
                        optimizer_model=chat,
                        optimizer_model_name="coach",
                        cache=cache,
                        on_event=recorder,
                    )
            # and an error from a rejected key
            async with OpenAIChat(base_url=server.base_url, api_key=CANARY + "-wrong") as bad:
                with pytest.raises(AuthenticationError) as info:
                    await Endpoint(bad, retry=RetryPolicy(max_attempts=1)).complete(
                        [{"role": "user", "content": "hi"}], {"model": "m"}
                    )
    assert server.stats.paid > 0  # the key really was used
    places = {
        "logs": json.dumps(logs, default=str),
        "events": json.dumps([e.data for e in recorder.events], default=str),
        "report": result.report.to_json() + result.report.to_markdown(),
        "cache": (tmp_path / "cache.sqlite").read_bytes().decode("latin-1"),
        "error": f"{info.value!s} {info.value!r} {info.value.__cause__!s}",
        "reprs": repr(chat) + repr(Endpoint(chat)),
    }
    for place, text in places.items():
        assert CANARY not in text and "canary-SECRET" not in text, place


@pytest.mark.slow
def test_cli_takes_the_key_from_the_environment_and_never_prints_it(tmp_path: Path) -> None:
    with SimulatedServer(ServerConfig(api_key=CANARY)) as server:
        data = tmp_path / "data.jsonl"
        data.write_text(
            "".join(
                json.dumps({"id": f"x{i}", "question": f"q{i}", "expected": f"q{i}"}) + "\n"
                for i in range(5)
            )
        )
        (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "sim"
[data]
train = "data.jsonl"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
api_key_env = "CANARY_KEY"
options = {{ base_url = "{server.base_url}" }}
[cache]
path = "cache.sqlite"
[output]
dir = "out"
""")
        env = {**os.environ, "CANARY_KEY": CANARY}
        done = subprocess.run(
            [sys.executable, "-m", "engine", "evaluate", str(tmp_path / "run.toml"), "--json-logs"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["score"] == 1.0
    assert CANARY not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "run.toml":
            assert CANARY.encode() not in path.read_bytes(), path
    assert oct((tmp_path / "cache.sqlite").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "out" / "evaluation_train.jsonl").stat().st_mode & 0o777) == "0o600"
