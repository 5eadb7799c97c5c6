"""Shared fixtures: a demo prompt, demo data, and a scripted model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import anyio
import pytest

from adapters import ArithmeticModel, ScriptedModel, arithmetic_examples
from engine import Example, Prompt
from engine.metrics import ExactMatch

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
