"""The program of `examples/program/run.toml`: extract the fact, then answer from it.

Offline: `TaskModel` and `CoachModel` are scripted providers (no key, no network).
The task model follows its prompts literally: ``extract`` upper-cases the fact only
when its prompt says UPPERCASE; ``answer`` drops its "Answer: " prefix only when its
prompt says ONLY.  The metric gives half for each, so both prompts must change.

    python -m engine optimize examples/program/run.toml
"""

from __future__ import annotations

import json
from typing import Any

from engine import Example, MetricResult
from engine.testing import ScriptedModel, ScriptedRequest

EXTRACT = "Extract the fact."
ANSWER = "Answer from the facts."


async def pipeline(lm: Any, example: Example) -> str:
    """Two stages: any async code may stand here (tools, retrieval, loops)."""
    facts = await lm("extract", text=example.inputs["text"])
    return str(await lm("answer", facts=facts, question=example.inputs["question"]))


def two_halves(example: Example, prediction: str) -> MetricResult:
    """Half for the upper-case fact, half for a bare answer (no prefix)."""
    upper = 0.5 if prediction.endswith(str(example.expected)) else 0.0
    bare = 0.0 if prediction.startswith("Answer:") else 0.5
    notes = [] if upper else ["the fact must be upper-case"]
    notes += [] if bare else ["answer with the fact only, no prefix"]
    return MetricResult(upper + bare, "; ".join(notes) or None)


two_halves.inline = True  # type: ignore[attr-defined]


def _task(request: ScriptedRequest) -> str:
    system, user = request.messages[0]["content"], request.messages[-1]["content"]
    if system.startswith(EXTRACT):
        return user.upper() if "UPPERCASE" in system else user
    facts = user.split("\nQ:")[0]
    return facts if "ONLY" in system else f"Answer: {facts}"


def _coach(request: ScriptedRequest) -> str:
    text = request.text
    if "## Prompt to improve\nextract" in text or "STAGE" in text and "-> fact" in text:
        return "STAGE: extract\nMake the extract prompt say UPPERCASE."
    if "## Prompt to improve\nanswer" in text or "## Prompt at fault" in text:
        return "STAGE: answer\nMake the answer prompt say ONLY."
    if "## Feedback to apply" in text:
        current = text.split("## Current prompt")[1].split("## Feedback to apply")[0]
        feedback = text.split("## Feedback to apply")[1].split("\n## ")[0]
        system, user = (
            (EXTRACT, "{text}") if EXTRACT in current else (ANSWER, "{facts}\nQ: {question}")
        )
        keyword = "UPPERCASE" if "UPPERCASE" in feedback else "ONLY"
        return json.dumps(
            {"messages": [{"role": "system", "content": f"{system} {keyword}"},
                          {"role": "user", "content": user}]}
        )  # fmt: skip
    return "Solve the task as the prompts say."  # the task and metric descriptions


class TaskModel(ScriptedModel):
    """The scripted task provider."""

    def __init__(self, latency: float = 0.0) -> None:
        super().__init__(_task, latency=latency)


class CoachModel(ScriptedModel):
    """The scripted optimizer."""

    def __init__(self) -> None:
        super().__init__(_coach)
