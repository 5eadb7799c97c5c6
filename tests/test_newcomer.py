"""Issue 19's "done when": `scripts/newcomer.sh` replays a new user's first hour on a fresh
temporary copy, offline, against the simulated provider (real HTTP, real subprocesses,
a real local Ray cluster), and every step passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = (
    "simulated provider",
    "1 copy the example folder and run it",
    "2 the README's endpoint snippet",
    "3 Ctrl-C a running evaluate, then resume",
    "4 bench --max-cost 1",
    "5a mistake: a run file copied without its folder",
    "5b mistake: [optimizer] without base_url",
    "5c mistake: api_key_env names an unset variable",
    "5d mistake: a wrong adapter name",
    "5e mistake: a placeholder the rows do not have",
    "6 a 4-worker local cluster",
)


@pytest.mark.slow
def test_a_new_users_first_hour_replays_offline() -> None:
    """Each step prints PASS or FAIL; the script stops at the first FAIL with its output."""
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "newcomer.sh")],
        capture_output=True,
        text=True,
        timeout=900,  # about 1.5 min on 2 busy cores; Ray's start-up is the slow part
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    passed = [line for line in done.stdout.splitlines() if line.startswith("PASS ")]
    for step, line in zip(STEPS, passed, strict=False):
        assert line.startswith(f"PASS {step}"), report
    assert len(passed) == len(STEPS) + 1 and passed[-1] == "PASS all steps", report
