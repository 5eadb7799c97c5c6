"""Plain helpers shared by several test modules (not fixtures: those live in conftest).

A test module never imports another test module (`tests/test_architecture.py` checks
it): whatever two of them share is here, or a fixture in ``conftest.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adapters import ArithmeticCoach, ArithmeticModel, ScriptedRequest

ROOT = Path(__file__).resolve().parents[1]

# A working run file over the simulated provider (BASE_URL replaced by its address).
RUN = """
[prompt]
messages = [{ role = "system", content = "Answer." }, { role = "user", content = "{question}" }]
model = "gpt-4o-mini"
temperature = 0.0

[data]
train = "train.jsonl"
val = "val.jsonl"
expected = "answer"

[metric]
use = "engine.metrics:ExactMatch"

[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = { base_url = "BASE_URL" }
limits = { rpm = 6000, concurrency = 8 }

[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
options = { base_url = "BASE_URL" }
model_name = "gpt-4o"

[trainer]
batch_size = 4

[budget]
max_calls = 100
prices = { "gpt-4o-mini" = [0.15, 0.60], "gpt-4o" = [2.50, 10.00] }

[cache]
path = "cache.sqlite"

[output]
dir = "out"
"""


def rows(prefix: str, n: int) -> str:
    """``n`` JSONL rows of ``i + 1`` questions, ids ``prefix0`` ..."""
    return "".join(
        f'{{"id": "{prefix}{i}", "question": "{i} + 1", "answer": "{i + 1}"}}\n' for i in range(n)
    )


def run_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m engine ARGS`` in a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
    )


_TASK, _COACH = ArithmeticModel(), ArithmeticCoach()


def demo_answer(messages: Sequence[Mapping[str, Any]], body: Mapping[str, Any]) -> str:
    """The demo task behind HTTP: the coach answers model 'coach', the task model the rest."""
    request = ScriptedRequest(tuple(dict(m) for m in messages), dict(body), 0.0, 1)
    handler = _COACH.handler if body.get("model") == "coach" else _TASK.handler
    return str(handler(request))


def postgres_binaries() -> bool:
    """Whether this machine can start a PostgreSQL server (``initdb`` is found)."""
    bin_dir = os.environ.get("PG_BIN")
    candidates = [Path(bin_dir)] if bin_dir else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return any((c / "initdb").exists() for c in candidates) or shutil.which("initdb") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def drop_tables(url: str, table: str) -> None:
    """Drop a `PostgresStore` table and its two companions, on a connection of its own."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for suffix in ("", "_meta", "_claims"):
            await conn.execute(f'DROP TABLE IF EXISTS "{table}{suffix}"')
    finally:
        await conn.close()
