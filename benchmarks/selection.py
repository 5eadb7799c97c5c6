"""Which selection policy generalizes: test score of the returned prompt, per policy.

**Synthetic mode** (default): a seeded task family built to overfit the way prompts do.
Examples come in ``KINDS`` kinds; about ``EASY`` of them are right with any prompt.  A
prompt holds two kinds of lines:

- a *general* rule ``Rule: kind-K.`` makes every example of kind K right;
- a *specific* line ``Case: <id>.`` memorizes one example: it is right from then on, but
  the line misfires on each other example of its kind with probability ``MISFIRE``
  (fixed per pair by a hash), making it wrong unless it is memorized itself.

The scripted optimizer (a `ScriptedModel` behind the default gradient and apply stages)
follows one generative rule, deterministic per seed: each proposal is general (a rule
for the kind of one failed example) with probability ``P_GENERAL``, else specific (a
case line for every failed example of the batch).  Specific proposals fix the batch and
mostly the training score too (the examples they break are often memorized already),
while they only hurt unseen examples: overfitting.  Train, validation and test sets are
disjoint; the optimizer never sees the test set, which scores the returned prompt.

Every policy runs with the same call budget (task + optimizer calls, ``--budget``) on the
same data; the table reports the mean test score and the paired difference against
greedy-on-train with a 95% t-interval over the seeds.

**Run-file mode** (``--run RUN.toml``): the same comparison on a real task and endpoint:
the run's ``[data] train`` rows are split three ways (seeded: 50% train, 25% validation,
25% test) and each policy's returned prompt is scored on the test part.

    python benchmarks/selection.py --seeds 30
    python benchmarks/selection.py --run examples/demo.toml --seeds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import statistics
import sys
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from engine import Budget, Cache, Example, Prompt, evaluate, optimize
from engine.metrics import ExactMatch
from engine.testing import ScriptedModel, ScriptedRequest

KINDS = 6
EASY = 0.3
MISFIRE = 0.15
P_GENERAL = 0.3
SIZES = {"train": 40, "val": 20, "test": 60}

POLICIES: dict[str, dict[str, Any]] = {
    "greedy, accept on train (seed's rule)": {},
    "greedy, accept on val": {"accept_on": "val"},
    "pareto": {"selection": "pareto"},
    "pareto + merge": {"selection": "pareto", "merge": True},
    "greedy on train + tie_break length": {"tie_break": ("length",)},
}
BASELINE = "greedy, accept on train (seed's rule)"

_ITEM = re.compile(r"item (\w+) of kind (\d+)")
_CASE = re.compile(r"Case: (\w+)\.")
_RULE = re.compile(r"Rule: kind-(\d+)\.")


def _unit(*parts: object) -> float:
    """A uniform number in [0, 1) fixed by ``parts`` (no shared RNG state)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class World:
    """One seed's task: every example's kind and whether it is easy."""

    seed: int
    kinds: dict[str, int]
    easy: set[str]
    capacity: int | None = None  # at most this many rules: a new one drops the oldest

    @classmethod
    def make(cls, seed: int, capacity: int | None = None) -> World:
        rng = random.Random(seed)
        total = sum(SIZES.values())
        ids = [f"x{seed}n{i}" for i in range(total)]
        kinds = {i: rng.randrange(KINDS) for i in ids}
        easy = {i for i in ids if rng.random() < EASY}
        return cls(seed, kinds, easy, capacity)

    def split(self) -> dict[str, list[Example]]:
        ids = list(self.kinds)
        out, start = {}, 0
        for name, size in SIZES.items():
            out[name] = [
                Example({"item": f"item {i} of kind {self.kinds[i]}"}, f"ok {i}", id=i)
                for i in ids[start : start + size]
            ]
            start += size
        return out

    def right(self, system: str, example_id: str) -> bool:
        """The generative rule of the task model (see the module docstring)."""
        cases = set(_CASE.findall(system))
        if example_id in cases:
            return True
        kind = self.kinds[example_id]
        for case in cases:
            if self.kinds.get(case) == kind and _unit(self.seed, case, example_id) < MISFIRE:
                return False
        return str(kind) in _RULE.findall(system) or example_id in self.easy

    def task_answer(self, request: ScriptedRequest) -> str:
        match = _ITEM.search(request.messages[-1]["content"])
        assert match is not None
        example_id = match.group(1)
        return f"ok {example_id}" if self.right(request.messages[0]["content"], example_id) else "?"

    def optimizer_answer(self, request: ScriptedRequest) -> str:
        text = request.messages[-1]["content"]
        if "## Prediction" in text:  # the gradient stage: name the example and its kind
            match = _ITEM.search(text)
            assert match is not None
            tries = text.count("\n- ") if "## Earlier feedback" in text else 0
            return f"Fix item {match.group(1)} of kind {match.group(2)} (try {tries})."
        if "## Feedback to apply" in text:
            return self._apply(text)
        return "Answer each item."  # a description (not asked: the run gives both)

    def _apply(self, text: str) -> str:
        current = re.search(r"## Current prompt\n(.*?)\n\n## ", text, re.DOTALL)
        assert current is not None
        messages = json.loads(current.group(1))
        feedback = text.split("## Feedback to apply\n", 1)[1].split("\n\n## ", 1)[0]
        lines = messages[0]["content"].split("\n")
        if "MERGE:" in feedback:  # keep both prompts' lines
            other = feedback.split("## Other prompt\n", 1)[1].split("\n## Common", 1)[0]
            added = [x for x in re.findall(r"(?:Rule|Case): [\w-]+\.", other) if x not in lines]
            lines += added
        else:
            failed = _ITEM.findall(feedback)
            rng = random.Random(f"{self.seed}:{messages[0]['content']}:{feedback}")
            if rng.random() < P_GENERAL:
                kind = rng.choice(failed)[1]
                new = [f"Rule: kind-{kind}."]
            else:
                new = [f"Case: {example_id}." for example_id, _ in failed]
            lines += [x for x in new if x not in lines]
        if self.capacity is not None:  # keep the newest rules only: trade-offs appear
            rules = [x for x in lines if x.startswith("Rule:")]
            dropped = set(rules[: max(len(rules) - self.capacity, 0)])
            lines = [x for x in lines if x not in dropped]
        messages[0]["content"] = "\n".join(lines)
        return json.dumps({"messages": messages})


def initial_prompt() -> Prompt:
    return Prompt(
        [
            {"role": "system", "content": "Answer 'ok' and the item's name."},
            {"role": "user", "content": "{item}"},
        ],
        model="task",
    )


async def synthetic_run(
    seed: int, policy: Mapping[str, Any], budget: int, capacity: int | None = None
) -> dict[str, float]:
    world = World.make(seed, capacity)
    data = world.split()
    task = ScriptedModel(world.task_answer, name="task")
    coach = ScriptedModel(world.optimizer_answer, name="coach")
    result = await optimize(
        initial_prompt(),
        data["train"],
        valset=data["val"],
        metric=ExactMatch(),
        model=task,
        optimizer_model=coach,
        optimizer_model_name="coach",
        task_description="Answer ok and the item.",
        metric_description="Exact match.",
        budget=Budget(max_calls=budget),
        seed=seed,
        **policy,
    )
    calls = task.calls + coach.calls
    test = await evaluate(result.prompt, data["test"], model=task, metric=ExactMatch())
    return {"test": test.conservative_score, "calls": calls, "val": result.val_score or 0.0}


# -- statistics -------------------------------------------------------------------------
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 19: 2.093, 29: 2.045}


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t (table; 1.96 past 120 degrees of freedom)."""
    if df in _T975:
        return _T975[df]
    if df >= 120:
        return 1.96
    # between table entries: the next lower df is conservative (wider)
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and its 95% t-interval."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan, math.nan
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def table(results: Mapping[str, list[dict[str, float]]], header: str) -> str:
    base = [r["test"] for r in results[BASELINE]]
    lines = [
        header,
        "",
        "| policy | mean test | diff vs greedy-on-train | 95% CI of diff | mean calls "
        "| wins/ties/losses |",
        "|---|---:|---:|---|---:|---|",
    ]
    for name, runs in results.items():
        test = [r["test"] for r in runs]
        diffs = [a - b for a, b in zip(test, base, strict=True)]
        d, lo, hi = mean_ci(diffs)
        ci = "-" if name == BASELINE else f"[{lo:+.3f}, {hi:+.3f}]"
        record = (
            f"{sum(x > 0 for x in diffs)}/{sum(x == 0 for x in diffs)}/{sum(x < 0 for x in diffs)}"
        )
        lines.append(
            f"| {name} | {statistics.fmean(test):.3f} | {d:+.3f} | {ci} | "
            f"{statistics.fmean(r['calls'] for r in runs):.0f} | {record} |"
        )
    return "\n".join(lines)


async def synthetic(seeds: int, budget: int, capacity: int | None) -> str:
    results: dict[str, list[dict[str, float]]] = {name: [] for name in POLICIES}
    for seed in range(seeds):
        for name, policy in POLICIES.items():
            results[name].append(await synthetic_run(seed, policy, budget, capacity))
    header = (
        f"Synthetic family: {seeds} seeds, train/val/test {SIZES['train']}/{SIZES['val']}/"
        f"{SIZES['test']}, {KINDS} kinds, easy {EASY}, misfire {MISFIRE}, "
        f"P(general proposal) {P_GENERAL}, call budget {budget} per run (task + optimizer), "
        f"rule capacity {capacity or 'none'}."
    )
    return table(results, header)


# -- run-file mode ----------------------------------------------------------------------
def three_way(rows: Sequence[Example], seed: int) -> dict[str, list[Example]]:
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    a, b = len(shuffled) // 2, (3 * len(shuffled)) // 4
    return {"train": shuffled[:a], "val": shuffled[a:b], "test": shuffled[b:]}


async def real_run(path: Path, seeds: int) -> str:
    from engine.cli._main import _endpoint, _metric_options
    from engine.cli._runfile import load_run_file

    run = load_run_file(path)
    if run.optimizer is None:
        raise SystemExit(f"{path}: needs an [optimizer] section")
    trainer = {k: v for k, v in run.trainer.items() if k not in {"selection", "accept_on"}}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in POLICIES}
    async with AsyncExitStack() as stack:
        task = await _endpoint(stack, run.model)
        opt = await _endpoint(stack, run.optimizer)
        scoring = _metric_options(run)
        for seed in range(seeds):
            data = three_way([*run.train, *(run.val or [])], seed)
            for name, policy in POLICIES.items():
                cache = Cache()  # one per run: each policy pays its own way (equal budgets)
                result = await optimize(
                    run.prompt,
                    data["train"],
                    valset=data["val"],
                    **scoring,
                    model=task,
                    optimizer_model=opt,
                    optimizer_model_name=run.optimizer.model_name,
                    cache=cache,
                    budget=run.budget,
                    **{**trainer, "seed": seed},
                    **policy,
                )
                test = await evaluate(
                    result.prompt, data["test"], model=task, metric=scoring["metric"], cache=cache
                )
                calls = sum(result.report.calls.values())
                results[name].append({"test": test.conservative_score, "calls": calls})
    budget = run.budget.max_calls if run.budget is not None else None
    header = (
        f"Run file {path}: {seeds} seeds, rows split 50/25/25, call budget {budget} per run "
        "(the run file's [budget]); calls are the optimization's, test scoring apart."
    )
    return table(results, header)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--budget", type=int, default=1200, help="calls per synthetic run")
    parser.add_argument(
        "--capacity", type=int, help="at most this many rules in a prompt (trade-offs)"
    )
    parser.add_argument("--run", type=Path, help="a run file: compare on its task instead")
    args = parser.parse_args(argv)
    if args.run is not None:
        text = anyio.run(real_run, args.run, args.seeds)
    else:
        text = anyio.run(synthetic, args.seeds, args.budget, args.capacity)
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
