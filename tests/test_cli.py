"""The CLI end to end, in real subprocesses: outputs, exit codes, dry runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.simulated_server import ServerConfig, SimulatedServer
from engine.cli._preflight import OPTIMIZE_FILES

from .conftest import screenshot_in_chromium
from .support import RUN, rows, run_cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


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
    (demo / "out").mkdir()
    (demo / "out" / "report.json").write_text("an older report")
    (demo / "out" / "report.json").chmod(0o644)  # its mode must not survive the rewrite
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
    assert "<svg" in page and "Prompt: initial vs best" in page and "only the number" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o600"}
    assert sorted(p.name for p in out.iterdir()) == sorted(OPTIMIZE_FILES)  # no temp file left

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
    assert plan["max_calls"] > 40 and plan["max_cost_usd"] > 0
    assert not (demo / "cache.sqlite").exists() and not (demo / "out").exists()


def test_dry_run_cost_bound_holds_for_the_run_that_follows(demo: Path) -> None:
    """The plan prices every kind of call on its own model, prompt and completion cap:
    the run that follows never costs more (the old plan priced only the task model's
    input, 116x too low), and every kind of call is in the printed table."""
    dry = run_cli("optimize", str(demo / "demo.toml"), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    kinds = {(row["kind"], row["model"]) for row in plan["calls"]}
    assert {("gradient", "coach"), ("apply", "coach"), ("description", "coach")} <= kinds
    assert {("initial", "demo"), ("batch", "demo"), ("full set", "demo")} <= kinds
    assert "gradient" in dry.stderr and "at most" in dry.stderr  # the table, for people
    done = run_cli("optimize", str(demo / "demo.toml"), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert 0 < summary["cost_usd"] <= plan["max_cost_usd"]
    for model, calls in summary["calls"].items():  # and per model, the calls
        planned = sum(row["calls"] for row in plan["calls"] if row["model"] == model)
        assert calls <= planned, (model, calls, planned)
    coach = sum(r["max_cost_usd"] for r in plan["calls"] if r["model"] == "coach")
    report = json.loads((demo / "out" / "report.json").read_text())
    assert report["cost"] <= plan["max_cost_usd"] and coach > 0


def test_dry_run_counts_a_duplicate_per_call_of_a_hedging_endpoint(demo: Path) -> None:
    """[model.retry] hedge_after doubles the task model's calls in the bound (one
    duplicate per attempt, both possibly billed), not the optimizer's; the run that
    follows, hedging every call, stays under it."""
    plain = json.loads(run_cli("optimize", str(demo / "demo.toml"), "--dry-run").stdout)
    run = demo / "demo.toml"
    # every task call runs 20 ms: a 5 ms delay hedges each of them
    run.write_text(
        run.read_text().replace(
            "limits = { rpm = 6000, concurrency = 16 }",
            "limits = { rpm = 6000, concurrency = 16 }\nretry = { hedge_after = 0.005 }",
        )
    )
    dry = run_cli("optimize", str(run), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    hedged = json.loads(dry.stdout)
    pairs = list(zip(plain["calls"], hedged["calls"], strict=True))
    assert all(h["calls"] == p["calls"] * (2 if p["model"] == "demo" else 1) for p, h in pairs)
    assert hedged["max_cost_usd"] > plain["max_cost_usd"]
    assert "duplicate paid in full" in hedged["note"] and "duplicate" not in plain["note"]
    done = run_cli("optimize", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    report = json.loads((demo / "out" / "report.json").read_text())
    assert report["hedges"]["sent"] > 0 and 0 < summary["cost_usd"] <= hedged["max_cost_usd"]
    assert summary["hedges"] == report["hedges"]  # stdout's summary says so too
    planned = sum(row["calls"] for row in hedged["calls"] if row["model"] == "demo")
    assert summary["calls"]["demo"] <= planned


def test_dry_run_says_unbounded_without_a_completion_cap(demo: Path) -> None:
    run = demo / "demo.toml"
    run.write_text(run.read_text().replace("params = { max_tokens = 64 }", ""))
    dry = run_cli("optimize", str(run), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["max_cost_usd"] is None
    assert "unbounded: set max_tokens" in plan["max_cost_usd_note"]


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
            'demo.toml:31: [trainer] batch_size must be an integer, got "four"',
        ),
        (
            lambda d: (d / "demo.toml").write_text(
                (d / "demo.toml").read_text().replace("rpm = 6000", "rpm = -1")
            ),
            "[model.limits] rpm must be a number > 0.0, got -1",
        ),
        (
            lambda d: (d / "demo.toml").write_text(
                (d / "demo.toml")
                .read_text()
                .replace(
                    "options = { latency = 0.02 }", 'options = { api_key = "sk-abcdefghijkl" }'
                )
            ),
            "[model] options.api_key holds a secret; run files never hold secrets",
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
            plan = json.loads(done.stdout)  # no max_tokens: no false number
            assert plan["max_cost_usd"] is None and "unbounded" in plan["max_cost_usd_note"]
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


def _server_run(folder: Path, server: SimulatedServer, model_lines: str = "") -> Path:
    """The bad-input table's run file against ``server``; ``model_lines`` go into
    its [model] section."""
    (folder / "train.jsonl").write_text(rows("t", 8))
    (folder / "val.jsonl").write_text(rows("v", 4))
    text = RUN.replace("BASE_URL", server.base_url)
    path = folder / "run.toml"
    path.write_text(text.replace("\n[optimizer]", model_lines + "\n[optimizer]", 1))
    return path


def test_evaluate_replaces_its_output_whole_and_private(tmp_path: Path) -> None:
    """An existing 0644 output is replaced by a complete 0600 file, no temp file left."""
    out = tmp_path / "results.jsonl"
    out.write_text("old\n")
    out.chmod(0o644)
    with SimulatedServer(ServerConfig()) as server:
        run = _server_run(tmp_path, server)
        done = run_cli("evaluate", str(run), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"t{i}" for i in range(8)]
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results")]


@pytest.mark.parametrize(
    ("env", "code", "message"),
    [
        ({"RUNFILE_TEST_KEY": "wrong-key"}, 1, "AuthenticationError"),  # fails mid-run
        ({}, 2, "[model] api_key_env: environment variable RUNFILE_TEST_KEY is not set"),
    ],
)
def test_a_failed_evaluate_leaves_the_old_output_untouched(
    tmp_path: Path, env: dict[str, str], code: int, message: str
) -> None:
    """evaluate --out never truncates a result file before the run has succeeded."""
    out = tmp_path / "results.jsonl"
    out.write_text("a result worth keeping\n" * 1000)
    before = out.read_bytes()
    with SimulatedServer(ServerConfig(api_key="right-key")) as server:
        run = _server_run(tmp_path, server, 'api_key_env = "RUNFILE_TEST_KEY"\n')
        done = run_cli("evaluate", str(run), "--out", str(out), "--quiet", env=env)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert out.read_bytes() == before
    left = {p.name for p in tmp_path.iterdir()}
    expected = {"results.jsonl", "run.toml", "train.jsonl", "val.jsonl"}  # no temp file
    assert left == expected | ({"cache.sqlite"} if code == 1 else set())  # exit 2: nothing made


def test_no_score_is_null_with_a_note_never_nan(tmp_path: Path) -> None:
    """When every example errors, stdout is valid JSON: null and the reason."""
    with SimulatedServer(ServerConfig(error_rate=1.0)) as server:
        run = _server_run(tmp_path, server, "retry = { max_attempts = 1 }\n")
        done = run_cli("evaluate", str(run), "--quiet")
    assert done.returncode == 1, done.stderr

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in stdout")

    summary = json.loads(done.stdout, parse_constant=no_constants)
    assert summary["score"] is None and summary["errors"] == 8 and summary["scored"] == 0
    assert summary["score_note"].startswith("no example was scored: 8 of 8 errored")


def test_a_budget_that_stops_optimize_before_any_score_exits_1(demo: Path) -> None:
    """No prompt was measured: exit 1 with the reason, no outputs, JSON without NaN."""
    toml = demo / "demo.toml"
    toml.write_text(toml.read_text().replace("max_calls = 5000", "max_calls = 1"))
    done = run_cli("optimize", str(toml), "--quiet")
    assert done.returncode == 1, done.stderr
    assert "failed: the run stopped before its first evaluation finished (budget: call budget" in (
        done.stderr
    )
    summary = json.loads(done.stdout)
    assert summary["score"] is None and summary["initial_score"] is None
    assert "budget" in summary["score_note"] and summary["output"] is None
    assert not (demo / "out").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_optimize_reports_a_refused_connection_as_fast_as_evaluate_and_once(
    tmp_path: Path,
) -> None:
    """Issue 19: optimize's first call (a description, alone) backed off ~35 s before
    failing with a message unlike evaluate's, printed twice.  Now the breaker of an
    endpoint that never answered opens after a few refusals: one message, naming the
    URL and where the run file sets it ([optimizer] inherits [model]'s)."""
    (tmp_path / "train.jsonl").write_text(rows("t", 4))
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "gpt-4o-mini"
params = {{ max_tokens = 16 }}
[data]
train = "train.jsonl"
expected = "answer"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{url}" }}
[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
model_name = "gpt-4o"
[output]
dir = "out"
""")
    messages = []
    for command in ("evaluate", "optimize"):
        started = time.monotonic()
        done = run_cli(command, str(tmp_path / "run.toml"))
        took = time.monotonic() - started
        assert done.returncode == 1, done.stderr
        assert took < 25, took  # one-sided: the old optimize slept 35 s of backoff
        assert done.stderr.count("connection refused") == 1, done.stderr  # once
        assert "run.toml:11 [model] options.base_url" in done.stderr
        messages.append(done.stderr.splitlines()[0])
    assert messages[0] == messages[1]  # same breaker, same message
    assert messages[0].startswith("failed: EndpointUnreachableError")


def _endpoint_run(folder: Path, base_url: str, extra: str = "") -> Path:
    (folder / "train.jsonl").write_text(rows("t", 4))
    path = folder / "run.toml"
    path.write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{question}}" }}]
model = "gpt-4o-mini"
params = {{ max_tokens = 16 }}
[data]
train = "train.jsonl"
expected = "answer"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{base_url}" }}
api_key_env = "NEWCOMER_TEST_KEY"
[optimizer]
adapter = "adapters.openai_chat:OpenAIChat"
model_name = "gpt-4o"
{extra}""")
    return path


def test_dry_run_shows_both_endpoints_and_checks_the_key(tmp_path: Path) -> None:
    """Issue 19: the dry run passed with an unset key and hid where [optimizer] went."""
    path = _endpoint_run(tmp_path, "http://127.0.0.1:8000/v1")
    env = {k: v for k, v in os.environ.items() if k != "NEWCOMER_TEST_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "engine", "optimize", str(path), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 2, done.stderr
    assert (
        "run.toml:12: [model] api_key_env: environment variable NEWCOMER_TEST_KEY is not set; "
        "fix: export NEWCOMER_TEST_KEY=<your key>"
    ) in done.stderr
    secret = "sk-newcomer-0123456789"
    done = run_cli("optimize", str(path), "--dry-run", env={"NEWCOMER_TEST_KEY": secret})
    assert done.returncode == 0, done.stderr
    assert secret not in done.stdout + done.stderr
    shown = json.loads(done.stdout)["endpoints"]
    assert shown == {
        "model": "http://127.0.0.1:8000/v1",
        "optimizer": "http://127.0.0.1:8000/v1 (inherited from [model])",
    }
    assert "[optimizer] calls http://127.0.0.1:8000/v1 (inherited from [model])" in done.stderr


def test_dry_run_fails_on_a_host_that_does_not_resolve(tmp_path: Path) -> None:
    path = _endpoint_run(
        tmp_path,
        "http://127.0.0.1:8000/v1",
        'options = { base_url = "http://no-such-host.invalid/v1" }',
    )
    done = run_cli("optimize", str(path), "--dry-run", env={"NEWCOMER_TEST_KEY": "k"})
    assert done.returncode == 2, done.stderr
    assert "run.toml:16: [optimizer] options.base_url: host 'no-such-host.invalid'" in done.stderr


@pytest.mark.slow
def test_sigterm_is_ctrl_c_the_cache_is_flushed_and_the_rerun_resumes(tmp_path: Path) -> None:
    """Issue 18: SIGTERM (docker stop, systemd, timeout) acted like kill -9: exit 143, no
    "interrupted" line.  Now it cancels the run like Ctrl-C: exit 130, the line, and every
    answer already paid for is in the cache (counted by the provider)."""
    n, concurrency = 600, 8
    rows = "".join(
        json.dumps({"id": f"r{i}", "q": f"row {i}", "a": f"row {i}"}) + "\n" for i in range(n)
    )
    (tmp_path / "data.jsonl").write_text(rows)
    with SimulatedServer(ServerConfig(latency_median=0.02, latency_sigma=0.3)) as server:
        (tmp_path / "run.toml").write_text(f"""
[prompt]
messages = [{{ role = "user", content = "{{q}}" }}]
model = "sim"
[data]
train = "data.jsonl"
expected = "a"
[model]
adapter = "adapters.openai_chat:OpenAIChat"
options = {{ base_url = "{server.base_url}" }}
limits = {{ rpm = 6000, concurrency = {concurrency} }}
[cache]
path = "cache.sqlite"
[output]
dir = "out"
""")
        command = [
            sys.executable,
            "-m",
            "engine",
            "evaluate",
            str(tmp_path / "run.toml"),
            "--quiet",
        ]
        # started as a shell script's background job is: SIGINT ignored (what CI hit:
        # a SIGTERM re-raised as SIGINT then did nothing and the run went on to exit 0)
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        deadline = time.monotonic() + 60
        while server.stats.paid < n // 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "interrupted; rerun the same command to resume" in stderr
        paid_before = server.stats.paid
        rerun = run_cli(*command[3:])
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert summary["completed"] == n and summary["errors"] == 0
        # what was answered before the signal came back from the cache, not paid again
        assert server.stats.paid <= n + concurrency, (paid_before, server.stats.paid)
        assert summary["cache_hits"] >= paid_before - concurrency


def test_venv_script_installs_only_when_pyproject_or_extras_change(tmp_path: Path) -> None:
    """Issue 19: demo.sh and test.sh reinstalled (and printed setuptools' 10-line notice)
    on every run.  A stub python records each pip call; the real hashing runs."""
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    log = tmp_path / "pip.log"
    stub = venv_bin / "python"
    stub.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "-m" ]; then echo "$@" >> {log}; '
        'echo "setuptools: Editable installation notice"; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    stub.chmod(0o755)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    script = ROOT / "scripts" / "venv.sh"

    def source(extras: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", f". {script} {extras}"], cwd=tmp_path, capture_output=True, text=True
        )

    first = source("dev")
    assert first.returncode == 0, first.stderr
    assert "Editable installation" not in first.stdout + first.stderr  # kept in the log
    assert log.read_text().count("-e .[dev]") == 1
    assert source("dev").returncode == 0
    assert log.read_text().count("-e .[dev]") == 1  # current: no reinstall
    source("plot")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    source("dev")
    assert log.read_text().count("-e .[dev]") == 2 and log.read_text().count("-e .[plot]") == 1
