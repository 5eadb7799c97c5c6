"""The CLI end to end, in real subprocesses: outputs, exit codes, dry runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import screenshot_in_chromium

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd or ROOT,
    )


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of the bundled demo run, writing into tmp_path."""
    for name in ("prompt.json", "arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        shutil.copy(EXAMPLES / name, tmp_path / name)
    text = (EXAMPLES / "demo.toml").read_text()
    text = text.replace("../out/demo/cache.sqlite", "cache.sqlite").replace(
        '"../out/demo"', '"out"'
    )
    (tmp_path / "demo.toml").write_text(text)
    return tmp_path


def test_optimize_then_evaluate_the_bundled_run(demo: Path) -> None:
    done = run_cli("optimize", str(demo / "demo.toml"), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["score"] == 1.0 and summary["initial_score"] < 0.5
    out = demo / "out"
    best = json.loads((out / "best_prompt.json").read_text())
    assert "{question}" in best["messages"][-1]["content"]
    report = json.loads((out / "report.json").read_text())
    assert report["best_score"] == 1.0 and report["steps"]
    assert (out / "report.md").read_text().startswith("# Optimization report")
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert (
        "<svg" in page and "Prompt: initial vs best" in page and "only&nbsp;the&nbsp;number" in page
    )
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert oct((out / "report.json").stat().st_mode & 0o777) == "0o600"

    again = run_cli(
        "evaluate",
        str(demo / "demo.toml"),
        "--prompt",
        str(out / "best_prompt.json"),
        "--split",
        "val",
        "--quiet",
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["score"] == 1.0 and result["calls"] == 0  # resumed from the SQLite cache
    lines = (out / "evaluation_val.jsonl").read_text().splitlines()
    assert len(lines) == 20 and all(json.loads(line)["result"]["score"] == 1.0 for line in lines)


def test_dry_run_calls_nothing(demo: Path) -> None:
    done = run_cli("optimize", str(demo / "demo.toml"), "--dry-run")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["max_calls"] > 40 and plan["max_cost_usd_estimate"] > 0
    assert not (demo / "cache.sqlite").exists() and not (demo / "out").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: (d / "arithmetic_train.jsonl").write_text(
                '{"id": "a", "question": "x", "answer": "1"}\n{broken\n'
            ),
            "arithmetic_train.jsonl:2",
        ),
        (
            lambda d: (d / "arithmetic_train.jsonl").write_text('{"id": "a", "question": "x"}\n'),
            "missing field 'answer'",
        ),
        (
            lambda d: (d / "arithmetic_train.jsonl").write_text(
                '{"id": "a", "question": "x", "answer": "1"}\n' * 2
            ),
            "duplicate id 'a'",
        ),
        (lambda d: (d / "arithmetic_train.jsonl").write_text(""), "empty"),
        (
            lambda d: (d / "demo.toml").write_text(
                (d / "demo.toml").read_text().replace("batch_size = 4", 'batch_size = "four"')
            ),
            "batch_size must be int",
        ),
        (
            lambda d: (d / "demo.toml").write_text(
                (d / "demo.toml").read_text().replace("rpm = 6000", "rpm = -1")
            ),
            "rpm must be a positive number",
        ),
        (
            lambda d: (d / "demo.toml").write_text(
                (d / "demo.toml")
                .read_text()
                .replace(
                    "options = { latency = 0.02 }", 'options = { api_key = "sk-abcdefghijkl" }'
                )
            ),
            "secrets come from the environment",
        ),
        (lambda d: (d / "demo.toml").write_text("[prompt\n"), "not valid TOML"),
    ],
)
def test_bad_input_exits_2_naming_the_place(demo: Path, edit: object, message: str) -> None:
    edit(demo)  # type: ignore[operator]
    done = run_cli("optimize", str(demo / "demo.toml"), "--quiet")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "sk-abcdefghijkl" not in done.stderr
    assert not (demo / "cache.sqlite").exists()


@pytest.mark.slow
def test_bench_command_runs_the_throughput_benchmark() -> None:
    done = run_cli("bench", "--simulated", "--scenario", "rate", "--scale", "0.05")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["pattern"] for r in rows] == ["engine", "waves", "threads"]
    engine = rows[0]
    assert engine["n"] == 50 and engine["lost"] == 0 and engine["score"] == 1.0


def test_dry_run_makes_zero_requests_at_the_server(tmp_path: Path) -> None:
    from adapters.simulated_server import ServerConfig, SimulatedServer

    with SimulatedServer(ServerConfig()) as server:
        (tmp_path / "data.jsonl").write_text('{"id": "a", "question": "q", "expected": "q"}\n')
        (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "gpt-4o-mini"
[data]
train = "data.jsonl"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{server.base_url}" }}
[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{server.base_url}" }}
model_name = "gpt-4o"
""")
        for command in ("optimize", "evaluate"):
            done = run_cli(command, str(tmp_path / "run.toml"), "--dry-run")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["max_cost_usd_estimate"] > 0
        assert server.stats.received == 0


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install chromium)"
)
def test_html_report_renders_in_headless_chromium(demo: Path, tmp_path: Path) -> None:
    done = run_cli("optimize", str(demo / "demo.toml"), "--quiet")
    assert done.returncode == 0, done.stderr
    data = screenshot_in_chromium(
        demo / "out" / "report.html", tmp_path / "report.png", tmp_path / "chromium-profile"
    )
    assert (
        data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    )  # a blank page is about 9 KB, the report about 85 KB
