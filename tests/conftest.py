"""Shared fixtures: a demo prompt, demo data, and a scripted model."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from adapters import ArithmeticModel, ScriptedModel, arithmetic_examples
from engine import Example, Prompt
from engine.metrics import ExactMatch

from .support import ROOT, drop_tables, free_port, postgres_binaries

# pytest rewrites the asserts of every package that ships a pytest plugin (anyio does),
# and anyio imports its asyncio backend lazily, the first time a test needs it.  That
# import, when it happens deep in a test's stack, trips CPython 3.11.7's "AST
# constructor recursion depth mismatch" inside the rewriter; importing it here, at a
# shallow depth, keeps every later lookup a dictionary hit.
anyio.run(anyio.to_thread.run_sync, lambda: None)


def screenshot_in_chromium(
    page: Path, shot: Path, profile: Path, *, size: tuple[int, int] = (1200, 1600)
) -> bytes:
    """Render an HTML file in headless Chromium (Debian's package) in a window of
    ``size`` (width, height) CSS pixels; the PNG's bytes."""
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=90,
        check=True,
    )
    return shot.read_bytes()


def qa_prompt(system: str = "Answer the question.", **kwargs: object) -> Prompt:
    params = {"model": "demo", "temperature": 0.0, **kwargs}
    return Prompt(
        [{"role": "system", "content": system}, {"role": "user", "content": "{question}"}],
        **params,  # type: ignore[arg-type]
    )


def echo_model(**kwargs: object) -> ScriptedModel:
    """Answers with the last user message verbatim."""
    return ScriptedModel(lambda r: r.messages[-1]["content"], **kwargs)  # type: ignore[arg-type]


def echo_examples(n: int, prefix: str = "e") -> list[Example]:
    return [Example({"question": f"item {i}"}, f"item {i}", id=f"{prefix}{i}") for i in range(n)]


@pytest.fixture
def prompt() -> Prompt:
    return qa_prompt()


@pytest.fixture
def metric() -> ExactMatch:
    return ExactMatch()


@pytest.fixture
def arithmetic() -> ArithmeticModel:
    return ArithmeticModel()


@pytest.fixture
def data() -> list[Example]:
    return arithmetic_examples(40)


# -- PostgreSQL (tests/test_postgres.py, test_shared_cache.py, test_cluster.py) --------
# The server is $PG_URL when set (CI starts one), else one this session starts with
# scripts/postgres.sh in a temporary directory and stops at the end.
@pytest.fixture(scope="session")
def pg_server() -> Iterator[dict[str, str]]:
    """A running server: ``{"url": ...}``, plus how to reach the script if we started it."""
    pytest.importorskip("asyncpg", reason="asyncpg is not installed (extra 'postgres')")
    url = os.environ.get("PG_URL")
    if url:
        yield {"url": url}
        return
    if not postgres_binaries():
        pytest.skip("PostgreSQL binaries are absent (apt-get install postgresql, or set PG_URL)")
    script = ROOT / "scripts" / "postgres.sh"
    port, directory = str(free_port()), tempfile.mkdtemp(prefix="textgrad-pg-")
    env = {**os.environ, "PG_DIR": directory}
    started = subprocess.run(
        ["bash", str(script), "start", port], capture_output=True, text=True, env=env, timeout=120
    )
    if started.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"scripts/postgres.sh start failed:\n{started.stderr}")
    try:
        yield {"url": started.stdout.strip().splitlines()[-1], "port": port, "dir": directory}
    finally:
        subprocess.run(["bash", str(script), "stop", port], env=env, timeout=60, check=False)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: dict[str, str]) -> str:
    return pg_server["url"]


@pytest.fixture
async def table(pg_url: str) -> AsyncIterator[str]:
    """A fresh table name; its three tables are dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:12]
    yield name
    await drop_tables(pg_url, name)
