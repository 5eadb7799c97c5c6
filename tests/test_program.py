"""Programs: several named prompts in one async pipeline (issue 23).

The scripted pipeline: ``extract`` copies the text (upper-cased only when its prompt
says UPPERCASE), ``answer`` repeats the facts (bare only when its prompt says ONLY,
else behind "Answer: ").  The metric gives half for the upper-cased fact and half for
a bare answer, so each stage must be fixed and neither alone reaches the full score.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Cache,
    ConfigError,
    Example,
    MetricResult,
    Prompt,
    evaluate,
    optimize,
)
from engine.testing import ScriptedModel, ScriptedRequest

EXTRACT_SYSTEM = "Extract the fact."
ANSWER_SYSTEM = "Answer from the facts."


def program_prompts() -> dict[str, Prompt]:
    return {
        "extract": Prompt(
            [{"role": "system", "content": EXTRACT_SYSTEM}, {"role": "user", "content": "{text}"}],
            model="task",
            temperature=0.0,
        ),
        "answer": Prompt(
            [
                {"role": "system", "content": ANSWER_SYSTEM},
                {"role": "user", "content": "{facts}\nQ: {question}"},
            ],
            model="task",
            temperature=0.0,
        ),
    }


async def pipeline(lm: Any, example: Example) -> str:
    facts = await lm("extract", text=example.inputs["text"])
    return str(await lm("answer", facts=facts, question=example.inputs["question"]))


def task_answer(request: ScriptedRequest) -> str:
    system, user = request.messages[0]["content"], request.messages[-1]["content"]
    if system.startswith(EXTRACT_SYSTEM):
        return user.upper() if "UPPERCASE" in system else user
    facts = user.split("\nQ:")[0]
    return facts if "ONLY" in system else f"Answer: {facts}"


def two_halves(example: Example, prediction: str) -> MetricResult:
    upper = 0.5 if prediction.endswith(str(example.expected)) else 0.0
    bare = 0.0 if prediction.startswith("Answer:") else 0.5
    feedback = []
    if not upper:
        feedback.append("the fact must be upper-case")
    if not bare:
        feedback.append("answer with the fact only, no prefix")
    return MetricResult(upper + bare, "; ".join(feedback) or None)


two_halves.inline = True  # type: ignore[attr-defined]


def examples(n: int, prefix: str = "p") -> list[Example]:
    return [
        Example({"text": f"fact {i}", "question": "what?"}, f"FACT {i}", id=f"{prefix}{i}")
        for i in range(n)
    ]


def coach_answer(request: ScriptedRequest) -> str:
    """The optimizer: gradients name the fix of the stage asked (or blamed); apply adds
    the keyword of the feedback to that stage's system message."""
    text = request.text
    if "## Prompt to improve\nextract" in text:
        return "Make the extract prompt say UPPERCASE."
    if "## Prompt to improve\nanswer" in text:
        return "Make the answer prompt say ONLY."
    if "## Prompt at fault" in text:
        trace = text.split("## Trace of this example")[1]
        if "-> fact" in trace:  # the extract output is still lower-case
            return "STAGE: extract\nMake the extract prompt say UPPERCASE."
        return "STAGE: answer\nMake the answer prompt say ONLY."
    if "## Feedback to apply" in text:
        current = text.split("## Current prompt")[1].split("## Feedback to apply")[0]
        feedback = text.split("## Feedback to apply")[1].split("\n## ")[0]
        if EXTRACT_SYSTEM in current:
            system, user = EXTRACT_SYSTEM, "{text}"
        else:
            system, user = ANSWER_SYSTEM, "{facts}\nQ: {question}"
        keyword = "UPPERCASE" if "UPPERCASE" in feedback else "ONLY"
        messages = [
            {"role": "system", "content": f"{system} {keyword}"},
            {"role": "user", "content": user},
        ]
        return json.dumps({"messages": messages})
    raise AssertionError(f"unexpected optimizer request: {text[:200]}")


async def run_optimize(component: str, **kwargs: Any) -> tuple[Any, ScriptedModel]:
    chat = ScriptedModel(task_answer)
    result = await optimize(
        program_prompts(),
        examples(6),
        program=pipeline,
        model=chat,
        metric=two_halves,
        optimizer_model=ScriptedModel(coach_answer),
        task_description="extract a fact, then answer with it",
        metric_description="half for the upper-case fact, half for a bare answer",
        batch_size=3,
        component=component,  # type: ignore[arg-type]
        **kwargs,
    )
    return result, chat


# -- evaluate -------------------------------------------------------------------------
async def test_a_program_runs_every_stage_and_keeps_the_trace() -> None:
    chat = ScriptedModel(task_answer)
    result = await evaluate(
        program_prompts(), examples(4), program=pipeline, model=chat, metric=two_halves
    )
    assert result.completed == 4 and result.errors == 0
    assert result.score == 0.0  # neither stage fixed
    assert result.calls == chat.calls == 8  # two lm calls per example
    trace = result.outcomes[0].trace
    assert [c.prompt for c in trace] == ["extract", "answer"]
    assert trace[0].variables == {"text": "fact 0"} and trace[0].output == "fact 0"
    assert trace[1].variables == {"facts": "fact 0", "question": "what?"}
    assert result.outcomes[0].to_dict()["trace"][1]["output"] == "Answer: fact 0"


async def test_changing_only_the_second_stage_pays_no_call_of_the_first() -> None:
    chat = ScriptedModel(task_answer)
    cache = Cache()
    prompts = program_prompts()
    data = examples(5)
    await evaluate(prompts, data, program=pipeline, model=chat, metric=two_halves, cache=cache)
    seen = Counter(r.messages[0]["content"].split(".")[0] for r in chat.requests)
    assert seen == {"Extract the fact": 5, "Answer from the facts": 5}
    only = prompts["answer"].replace(
        messages=[
            {"role": "system", "content": ANSWER_SYSTEM + " ONLY"},
            {"role": "user", "content": "{facts}\nQ: {question}"},
        ]
    )
    changed = {**prompts, "answer": only}
    again = await evaluate(
        changed, data, program=pipeline, model=chat, metric=two_halves, cache=cache
    )
    paid = Counter(r.messages[0]["content"].split(".")[0] for r in chat.requests[10:])
    assert paid == {"Answer from the facts": 5}  # every extract call was a cache hit
    assert again.calls == 5 and again.score == 0.5
    assert all(o.trace[0].cached and not o.trace[1].cached for o in again.outcomes)
    assert (
        again.prompt_hash
        != (
            await evaluate(
                prompts, data, program=pipeline, model=chat, metric=two_halves, cache=cache
            )
        ).prompt_hash
    )  # another prompt: another identity of the final predictions


async def test_a_program_that_raises_is_an_error_outcome_of_its_example() -> None:
    chat = ScriptedModel(task_answer)

    async def fragile(lm: Any, example: Example) -> str:
        facts = await lm("extract", text=example.inputs["text"])
        if example.id == "p1":
            raise RuntimeError("no facts found")
        return str(await lm("answer", facts=facts, question="q"))

    result = await evaluate(
        program_prompts(), examples(3), program=fragile, model=chat, metric=two_halves
    )
    assert result.completed == 3 and result.errors == 1 and result.scored == 2
    failed = result.outcomes[1]
    assert failed.error is not None and failed.error.stage == "program"
    assert failed.error.type == "ProgramError" and "no facts found" in failed.error.message
    assert [c.prompt for c in failed.trace] == ["extract"]  # what it did before it raised


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda lm, e: lm("answr", facts="x", question="q"), "no prompt of that name"),
        (lambda lm, e: lm("answer", facts="x"), "missing placeholder(s) ['question']"),
    ],
)
async def test_a_bad_lm_call_is_a_config_error_before_any_paid_call(
    call: Any, message: str
) -> None:
    chat = ScriptedModel(task_answer)

    async def broken(lm: Any, example: Example) -> str:
        facts = await lm("extract", text=example.inputs["text"])
        return str(await call(lm, facts))

    with pytest.raises(ConfigError, match=re.escape(message)):
        await evaluate(
            program_prompts(), examples(3), program=broken, model=chat, metric=two_halves
        )
    with pytest.raises(ConfigError, match=re.escape(message)):
        await optimize(
            program_prompts(),
            examples(3),
            program=broken,
            model=chat,
            metric=two_halves,
            optimizer_model=ScriptedModel(coach_answer),
        )
    assert chat.calls == 0


async def test_model_may_be_a_mapping_per_prompt() -> None:
    small, large = ScriptedModel(task_answer), ScriptedModel(task_answer)
    result = await evaluate(
        program_prompts(),
        examples(3),
        program=pipeline,
        model={"extract": small, "answer": large},
        metric=two_halves,
    )
    assert result.completed == 3 and small.calls == 3 and large.calls == 3
    with pytest.raises(ConfigError, match="missing"):
        await evaluate(
            program_prompts(), examples(3), program=pipeline, model={"extract": small},
            metric=two_halves,
        )  # fmt: skip


# -- optimize -------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["round_robin", "blame"])
async def test_optimizing_a_program_fixes_both_stages(component: str) -> None:
    result, chat = await run_optimize(component)
    assert result.score == 1.0
    assert "UPPERCASE" in result.prompts["extract"].messages[0]["content"]
    assert "ONLY" in result.prompts["answer"].messages[0]["content"]
    program = result.report.program
    assert program["component"] == component
    changed = {name: p["changed_at"] for name, p in program["prompts"].items()}
    assert all(len(steps) == 1 for steps in changed.values()), changed
    assert changed["extract"] != changed["answer"]  # one prompt per step
    assert [s.stage for s in result.report.steps] == [
        "extract" if changed["extract"][0] == s.step else "answer" for s in result.report.steps
    ]
    # nothing paid twice: every (prompt, variables) the provider saw, it saw once
    sent = Counter((r.messages[0]["content"], r.messages[-1]["content"]) for r in chat.requests)
    assert max(sent.values()) == 1
    stages = program["stages"]
    assert stages["extract"]["calls"] + stages["answer"]["calls"] == chat.calls
    assert stages["extract"]["cache_hits"] > 0


async def test_a_step_changing_the_second_stage_pays_no_call_of_the_first() -> None:
    result, chat = await run_optimize("round_robin")
    steps = {s.stage: s.step for s in result.report.steps if s.stage}
    assert result.report.program["prompts"]["answer"]["changed_at"] == [steps["answer"]]
    # the extract prompt has two versions, each paid once per example; the answer
    # step's candidates (and the full-set judgement) paid no extract call
    extract_calls = [r for r in chat.requests if r.messages[0]["content"].startswith("Extract")]
    assert len(extract_calls) == 2 * 6


async def test_the_report_shows_every_prompt_before_and_after() -> None:
    result, _ = await run_optimize("round_robin")
    markdown = result.report.to_markdown()
    assert "## Program" in markdown
    assert "extract" in markdown and "answer" in markdown and "UPPERCASE" in markdown
    data = result.report.to_dict()
    assert data["program"]["prompts"]["answer"]["initial"]["messages"][0]["content"] == (
        ANSWER_SYSTEM
    )


async def test_a_program_asks_for_what_it_cannot_do_yet() -> None:
    chat = ScriptedModel(task_answer)
    with pytest.raises(ConfigError, match="greedy"):
        await optimize(
            program_prompts(), examples(3), valset=examples(3, "v"), program=pipeline,
            model=chat, metric=two_halves, optimizer_model=chat, selection="pareto",
        )  # fmt: skip
    with pytest.raises(ConfigError, match="component"):
        await optimize(
            program_prompts(), examples(3), program=pipeline, model=chat,
            metric=two_halves, optimizer_model=chat, component="everything",  # type: ignore[arg-type]
        )  # fmt: skip
    assert chat.calls == 0


# -- rate, faults and resume through a real provider -----------------------------------
ECHO_PROMPTS = {
    "extract": Prompt(
        [{"role": "system", "content": "List the facts."}, {"role": "user", "content": "{text}"}],
        model="sim",
    ),
    "answer": Prompt(
        [
            {"role": "system", "content": "Answer from the facts."},
            {"role": "user", "content": "{facts}"},
        ],
        model="sim",
    ),
}


async def echo_pipeline(lm: Any, example: Example) -> str:
    facts = await lm("extract", text=example.inputs["text"])
    return str(await lm("answer", facts=facts))


def echo_rows(n: int) -> list[Example]:
    return [Example({"text": f"row {i}"}, f"row {i}", id=f"r{i}") for i in range(n)]


@pytest.mark.slow
async def test_a_thousand_two_call_examples_reach_the_rate_bound_through_openai_chat() -> None:
    """1,000 examples of a two-call program through OpenAIChat against the simulated
    provider at RPM 3000: nothing lost, <= 2% 429s, >= 0.95 of the rate bound."""
    import time

    from adapters.openai_chat import OpenAIChat
    from adapters.simulated_server import ServerConfig, SimulatedServer
    from engine import Limits
    from engine.metrics import ExactMatch

    config = ServerConfig(rpm=3000, latency_median=0.05, latency_sigma=0.3, seed=5)
    async with SimulatedServer(config) as server:
        async with OpenAIChat(
            base_url=server.base_url, limits=Limits(rpm=3000, concurrency=64)
        ) as chat:
            started = time.monotonic()
            result = await evaluate(
                ECHO_PROMPTS, echo_rows(1000), program=echo_pipeline, model=chat,
                metric=ExactMatch(), cache=Cache(),
            )  # fmt: skip
            wall = time.monotonic() - started
    stats = server.stats
    assert result.completed == 1000 and result.errors == 0 and result.score == 1.0
    assert stats.paid == 2000
    assert stats.rate_limited <= 0.02 * stats.received
    bound = stats.paid / (3000 / 60)  # the time the provider's rate needs for this work
    assert bound / wall >= 0.95, (bound, wall, stats.paid)


RESUME_SCRIPT = """
import asyncio, json, sys
from adapters.openai_chat import OpenAIChat
from engine import Cache, Example, Limits, Prompt, evaluate
from engine.metrics import ExactMatch

PROMPTS = {
    "extract": Prompt([{"role": "user", "content": "Facts: {text}"}], model="sim"),
    "answer": Prompt([{"role": "user", "content": "{facts}"}], model="sim"),
}

async def pipeline(lm, example):
    facts = await lm("extract", text=example.inputs["text"])
    return await lm("answer", facts=facts)

async def main(url, path, n):
    rows = [Example({"text": f"row {i}"}, f"Facts: row {i}", id=f"r{i}") for i in range(n)]
    async with Cache.sqlite(path) as cache, OpenAIChat(
        base_url=url, limits=Limits(rpm=6000, concurrency=16)
    ) as chat:
        result = await evaluate(PROMPTS, rows, program=pipeline, model=chat,
                                metric=ExactMatch(), cache=cache)
    print(json.dumps({"completed": result.completed, "errors": result.errors,
                      "score": result.score, "calls": result.calls}))

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


@pytest.mark.slow
def test_kill_9_mid_program_then_resume_pays_no_finished_call_twice(tmp_path: Path) -> None:
    """A real subprocess runs a two-call program on 1,000 examples into a SQLite cache;
    kill -9 halfway; the rerun completes everything and the provider is paid at most
    the calls in flight at the kill (16) beyond the 2,000 a single run needs."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from adapters.simulated_server import ServerConfig, SimulatedServer

    n, concurrency = 1000, 16
    script = tmp_path / "run_program.py"
    script.write_text(RESUME_SCRIPT)
    cache = tmp_path / "cache.sqlite"
    root = Path(__file__).resolve().parents[1]
    with SimulatedServer(ServerConfig(latency_median=0.02, latency_sigma=0.3)) as server:
        command = [sys.executable, str(script), server.base_url, str(cache), str(n)]
        proc = subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while server.stats.paid < n:  # half of the 2n calls
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        paid_before = server.stats.paid
        assert paid_before < 2 * n
        rerun = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stderr
        summary = json.loads(rerun.stdout)
        assert summary["completed"] == n and summary["errors"] == 0 and summary["score"] == 1.0
        assert server.stats.paid <= 2 * n + concurrency
        assert summary["calls"] == server.stats.paid - paid_before


# -- run files ----------------------------------------------------------------------------
def program_run_file(folder: Path, extra: str = "", adapter_line: str = "") -> Path:
    """The example's run file, its outputs and cache moved into ``folder``."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "examples" / "program" / "run.toml").read_text()
    text = text.replace('train = "data.jsonl"', f'train = "{root}/examples/program/data.jsonl"')
    text = text.replace("../../out/program/cache.sqlite", "cache.sqlite")
    text = text.replace('dir = "../../out/program"', 'dir = "out"')
    if adapter_line:
        text = text.replace(
            'model = "demo"\ntemperature = 0.0\n\n[data]', adapter_line + "\n\n[data]"
        )
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run.toml"
    run.write_text(text + extra)
    return run


def test_the_program_example_optimizes_offline_from_its_run_file(tmp_path: Path) -> None:
    from .support import run_cli

    run = program_run_file(tmp_path / "run")
    done = run_cli("optimize", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["score"] == 1.0 and summary["initial_score"] == 0.0
    out = tmp_path / "run" / "out"
    best = json.loads((out / "best_prompt.json").read_text())
    assert "UPPERCASE" in best["extract"]["messages"][0]["content"]
    assert "ONLY" in best["answer"]["messages"][0]["content"]
    report = json.loads((out / "report.json").read_text())
    assert report["program"]["component"] == "blame"
    assert {s["stage"] for s in report["steps"] if s["stage"]} == {"extract", "answer"}
    assert "## Program" in (out / "report.md").read_text()
    again = run_cli("evaluate", str(run), "--quiet")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["completed"] == 12


def test_dry_run_bounds_a_programs_calls_with_calls_per_example(tmp_path: Path) -> None:
    from .support import run_cli

    run = program_run_file(tmp_path / "one")
    plan = json.loads(run_cli("evaluate", str(run), "--dry-run").stdout)
    assert plan["max_calls"] == 12 * 2  # one call of each prompt per example
    text = run.read_text().replace(
        "calls_per_example = { extract = 1, answer = 1 }", "calls_per_example = 5"
    )
    run.write_text(text)
    plan = json.loads(run_cli("evaluate", str(run), "--dry-run").stdout)
    assert plan["max_calls"] == 12 * 10


def test_a_prompts_adapter_must_name_an_adapters_table(tmp_path: Path) -> None:
    from .support import run_cli

    line = 'model = "demo"\ntemperature = 0.0\nadapter = "small"'
    run = program_run_file(tmp_path / "bad", adapter_line=line)
    done = run_cli("evaluate", str(run), "--dry-run")
    assert done.returncode == 2 and "no [adapters.small] table" in done.stderr
    table = '\n[adapters.small]\nadapter = "examples.program.pipeline:TaskModel"\n'
    run.write_text(run.read_text() + table)
    done = run_cli("evaluate", str(run), "--quiet")
    assert done.returncode == 0, done.stderr
