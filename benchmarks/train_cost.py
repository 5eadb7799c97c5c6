"""Training-run cost: calls and tokens with cache + racing against both off.

The task is a seeded scripted "skills" task: each example needs one of eight rules,
with skewed frequencies; the task model gets it right only when the prompt states its
rule.  The coach proposes the rules of the failed examples, but a prompt holds at most
three rules (the apply stage keeps the newest), so many candidates fix the batch while
losing a more frequent rule on the full set: exactly the candidates racing cuts.

    python benchmarks/train_cost.py --train 240 --seed 42
"""

from __future__ import annotations

import argparse
import json
import random
import re
from typing import Any

import anyio

from adapters import ScriptedModel, ScriptedRequest
from engine import Cache, Example, Prompt, optimize
from engine.metrics import ExactMatch

RULES = [f"rule-{c}" for c in "abcdefgh"]
WEIGHTS = [30, 22, 16, 11, 8, 6, 4, 3]
CAPACITY = 3
_RULE = re.compile(r"Apply (rule-[a-h])\.")


def make_examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rule = rng.choices(RULES, WEIGHTS)[0]
        out.append(Example({"item": f"case {i} needs {rule}"}, f"ok {i}", id=f"s{i}"))
    return out


def task_answer(request: ScriptedRequest) -> str:
    system = request.messages[0]["content"]
    user = request.messages[-1]["content"]
    match = re.match(r"case (\d+) needs (rule-[a-h])", user)
    assert match is not None
    number, rule = match.groups()
    return f"ok {number}" if f"Apply {rule}." in system else f"wrong {number}"


def coach_answer(request: ScriptedRequest) -> str:
    text = request.messages[-1]["content"]
    if request.messages[0]["content"].startswith("Describe"):
        return "Answer ok for each case."
    if "## Prediction" in text:
        rule = re.search(r"needs (rule-[a-h])", text)
        assert rule is not None
        return f"Add the instruction: Apply {rule.group(1)}."
    current = re.search(r"## Current prompt\n(.*?)\n\n## ", text, re.DOTALL)
    feedback = text.split("## Feedback to apply\n", 1)[1].split("\n\n## ", 1)[0]
    assert current is not None
    messages = json.loads(current.group(1))
    rules = _RULE.findall(messages[0]["content"])
    for rule in _RULE.findall(feedback):
        if rule in rules:
            rules.remove(rule)
        rules.append(rule)
    rules = rules[-CAPACITY:]
    messages[0]["content"] = "Answer the case. " + " ".join(f"Apply {r}." for r in rules)
    return json.dumps({"messages": messages})


async def run(train: list[Example], *, fast: bool, seed: int) -> dict[str, Any]:
    task = ScriptedModel(task_answer, name="task")
    coach = ScriptedModel(coach_answer, name="coach")
    prompt = Prompt(
        [{"role": "system", "content": "Answer the case."}, {"role": "user", "content": "{item}"}],
        model="task",
    )
    result = await optimize(
        prompt,
        train,
        metric=ExactMatch(),
        model=task,
        optimizer_model=coach,
        optimizer_model_name="coach",
        seed=seed,
        cache=Cache() if fast else False,
        racing=fast,
        task_description="Answer each case.",
        metric_description="Exact match.",
    )
    tokens = sum(sum(v) for v in result.report.tokens.values())
    return {
        "mode": "cache+racing" if fast else "no cache, no racing",
        "calls": task.calls + coach.calls,
        "task_calls": task.calls,
        "optimizer_calls": coach.calls,
        "tokens": tokens,
        "score": result.score,
        "prompt": result.prompt.messages[0]["content"],
        "decisions": result.report.decisions(),
        "raced": result.report.raced_evaluations,
        "full_evaluations": result.report.full_evaluations,
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    train = make_examples(args.train, args.seed)
    fast = await run(train, fast=True, seed=args.seed)
    slow = await run(train, fast=False, seed=args.seed)
    assert fast["prompt"] == slow["prompt"] and fast["decisions"] == slow["decisions"]
    for row in (fast, slow):
        print(
            f"{row['mode']:>20}: {row['calls']:6d} calls ({row['task_calls']} task, "
            f"{row['optimizer_calls']} optimizer), {row['tokens']:8d} tokens, score "
            f"{row['score']:.3f}, full validations {row['full_evaluations']} "
            f"(cut by racing {row['raced']})"
        )
    print(
        f"ratio: calls {fast['calls'] / slow['calls']:.3f}, "
        f"tokens {fast['tokens'] / slow['tokens']:.3f}; "
        f"identical final prompt and decisions: True; proposals {len(fast['decisions'])}"
    )


if __name__ == "__main__":
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    anyio.run(main)
