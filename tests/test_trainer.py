"""optimize(): the TextGradientTrainer trajectory, checked against DESIGN.md section 2."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import anyio
import pytest

from adapters import (
    ArithmeticCoach,
    ArithmeticModel,
    ScriptedModel,
    ScriptedRequest,
    arithmetic_examples,
)
from engine import (
    ApplyContext,
    Budget,
    ConfigError,
    Example,
    GradientContext,
    Prompt,
    TrainerSettings,
    optimize,
)
from engine.metrics import ExactMatch
from engine.stages import LLMApply

from .conftest import qa_prompt

DESCRIPTIONS = {"task_description": "Say ok.", "metric_description": "ok scores 1."}


def level_prompt(level: int) -> Prompt:
    return Prompt(
        [
            {"role": "system", "content": f"level {level}"},
            {"role": "user", "content": "{question}"},
        ],
        model="table",
    )


class TableTask:
    """A task model whose answers come from a table: prompt level -> examples it gets right."""

    def __init__(self, n: int, table: dict[int, set[int]]) -> None:
        self.examples = [Example({"question": f"t{i}"}, "ok", id=f"t{i}") for i in range(n)]
        self.table = table
        self.model = ScriptedModel(self._answer, name="table")

    def _answer(self, request: ScriptedRequest) -> str:
        level = int(re.search(r"level (\d+)", request.messages[0]["content"]).group(1))  # type: ignore[union-attr]
        index = int(request.messages[-1]["content"][1:])
        return "ok" if index in self.table[level] else "bad"

    def order(self, seed: int = 42) -> list[int]:
        """The trainer's shuffle, replicated: a seeded copy of the training list."""
        indices = list(range(len(self.examples)))
        random.Random(seed).shuffle(indices)
        return indices

    def requests_for(self, level: int) -> list[ScriptedRequest]:
        return [r for r in self.model.requests if r.messages[0]["content"] == f"level {level}"]


class Stages:
    """Scripted gradient and apply stages that record every context they see."""

    def __init__(self, proposals: Sequence[Prompt]) -> None:
        self.proposals = list(proposals)
        self.gradient_calls: list[GradientContext] = []
        self.apply_calls: list[ApplyContext] = []

    async def gradient(self, ctx: GradientContext) -> str:
        self.gradient_calls.append(ctx)
        return f"fix {ctx.example.id}"

    async def apply(self, ctx: ApplyContext) -> Prompt:
        self.apply_calls.append(ctx)
        return self.proposals[len(self.apply_calls) - 1]


async def run_table(task: TableTask, stages: Stages, **kwargs: object) -> object:
    return await optimize(
        level_prompt(0),
        task.examples,
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=stages.gradient,
        apply=stages.apply,
        **{**DESCRIPTIONS, **kwargs},  # type: ignore[arg-type]
    )


async def test_weak_prompt_reaches_the_maximum_when_one_instruction_fixes_everything() -> None:
    data = arithmetic_examples(40)
    result = await optimize(
        qa_prompt(),
        data[:30],
        valset=data[30:],
        metric=ExactMatch(),
        model=ArithmeticModel(habits=("chatty",)),
        optimizer_model=ArithmeticCoach(),
        optimizer_model_name="coach",
    )
    report = result.report
    assert report.initial_score < 0.7 and result.score == 1.0 and result.val_score == 1.0
    assert report.stopped_reason == "maximum score reached"
    assert "only the number" in result.prompt.messages[0]["content"]
    accepted = [p for p in report.proposals if p.accepted]
    assert len(accepted) == 1 and accepted[0].full_score == 1.0
    assert report.generated_descriptions == ["task", "metric"]
    assert set(report.calls) == {"demo", "coach"}
    assert "**1.000**" in report.to_markdown()


async def test_batch_improvement_without_full_improvement_is_rejected_with_its_full_score() -> None:
    """Batch winner but full loser: the report keeps its exact full score, the history
    says "below the best" (racing would not know the exact score); a batch loser gets 0
    and costs no full-set call; the accepted maximum ends the run."""
    n = 16
    probe = TableTask(n, {})
    batch0 = set(probe.order()[:4])
    everyone = set(range(n))
    task = TableTask(n, {0: everyone - batch0, 1: batch0, 2: everyone - batch0, 3: everyone})
    stages = Stages([level_prompt(1), level_prompt(2), level_prompt(3)])
    result = await run_table(task, stages, racing=False)
    reasons = [p.reason.split(":")[0] for p in result.report.proposals]  # type: ignore[attr-defined]
    assert reasons == ["no full-set improvement", "no batch improvement", "accepted"]
    assert result.report.proposals[0].full_score == 4 / 16  # type: ignore[attr-defined]
    histories = [[(h.prompt, h.score) for h in c.history] for c in stages.apply_calls]
    assert histories[1] == [(level_prompt(1), 12 / 16)]  # below the best, 0.75
    assert histories[2] == [(level_prompt(1), 12 / 16), (level_prompt(2), 0.0)]
    assert "below the best (0.750)" in stages.apply_calls[1].history[0].heading()
    assert len(task.requests_for(2)) == 4  # the batch only: no full-set call
    assert len(task.requests_for(1)) == 16
    assert result.prompt == level_prompt(3) and result.score == 1.0  # type: ignore[attr-defined]
    assert len(result.report.steps) == 1  # type: ignore[attr-defined]


async def test_perfect_batch_makes_no_gradient_call() -> None:
    n = 12
    order = TableTask(n, {}).order()
    task = TableTask(n, {0: set(order[:4]), 1: set(range(n))})
    stages = Stages([level_prompt(1)])
    result = await run_table(task, stages)
    steps = result.report.steps  # type: ignore[attr-defined]
    assert steps[0].perfect and steps[0].proposals == []
    assert {c.example.id for c in stages.gradient_calls} == {f"t{i}" for i in order[4:8]}
    assert steps[1].proposals[0].accepted and result.score == 1.0  # type: ignore[attr-defined]


async def test_feedback_history_is_per_example_and_reset_per_batch() -> None:
    n = 12
    order = TableTask(n, {}).order()
    batch0, batch1 = set(order[:4]), set(order[4:8])
    task = TableTask(n, {0: set(), 1: batch0, 2: batch0, 3: set(range(n))})
    stages = Stages([level_prompt(1), level_prompt(2), level_prompt(3)])
    await run_table(task, stages)
    by_step: dict[str, list[tuple[str, ...]]] = {}
    for ctx in stages.gradient_calls:
        by_step.setdefault(ctx.example.id, []).append(ctx.earlier_feedback)
    for i in batch0:  # step 0: one attempt, accepted
        assert by_step[f"t{i}"] == [()]
    for i in batch1:  # step 1: fresh history, then this example's own feedback only
        assert by_step[f"t{i}"] == [(), (f"fix t{i}",)]


async def test_history_holds_at_most_history_size_entries() -> None:
    n = 8
    task = TableTask(n, {0: set(), **{k: set() for k in range(1, 6)}})
    stages = Stages([level_prompt(k) for k in range(1, 6)] * 4)
    result = await run_table(task, stages, history_size=2)
    lengths = [len(c.history) for c in stages.apply_calls]
    assert max(lengths) == 2 and lengths[:3] == [0, 1, 2]
    assert stages.apply_calls[3].history[-1].prompt == level_prompt(3)
    assert all(len(s.proposals) == 5 for s in result.report.steps)  # type: ignore[attr-defined]


async def test_racing_changes_cost_not_decisions() -> None:
    n = 40
    probe = TableTask(n, {})
    batch0 = set(probe.order()[:4])
    everyone = set(range(n))
    table = {0: everyone - batch0, 1: batch0, 2: batch0 | set(range(30)), 3: everyone}
    runs = {}
    for racing in (True, False):
        task = TableTask(n, table)
        stages = Stages([level_prompt(1), level_prompt(2), level_prompt(3)])
        result = await run_table(task, stages, racing=racing)
        runs[racing] = (
            result,
            task.model.calls,
            # the whole history and the text the default apply stage would be shown
            [(c.history, LLMApply.messages(None, c)) for c in stages.apply_calls],  # type: ignore[arg-type]
        )
    (raced, raced_calls, raced_hist), (full, full_calls, full_hist) = runs[True], runs[False]
    assert raced.prompt == full.prompt and raced.score == full.score  # type: ignore[attr-defined]
    assert raced.report.decisions() == full.report.decisions()  # type: ignore[attr-defined]
    assert raced_hist == full_hist
    assert any(hist for hist, _ in raced_hist)  # the histories compared are not empty
    assert raced_calls < full_calls
    assert raced.report.raced_evaluations >= 1 and raced.report.examples_skipped_by_racing > 0  # type: ignore[attr-defined]


async def test_invalid_proposals_are_survived_and_reported() -> None:
    """Garbage, a dropped placeholder and an invented one are failed attempts, not crashes."""
    replies = iter(
        [
            "Sure! Here is a much better prompt for you.",
            '{"messages": [{"role": "system", "content": "level 1"}, {"role": "user", "content": "no input"}]}',
            '```json\n{"messages": [{"role": "user", "content": "level 1 {question} {context}"}]}\n```',
            'Here you go: "messages": [{"role": "system", "content": "level 3"}, '
            '{"role": "user", "content": "{question}"}]}',
        ]
    )
    optimizer = ScriptedModel(lambda r: next(replies), name="opt")
    task = TableTask(8, {0: set(), 3: set(range(8))})
    result = await optimize(
        level_prompt(0),
        task.examples,
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=optimizer,
        gradient=Stages([]).gradient,
        **DESCRIPTIONS,  # type: ignore[arg-type]
    )
    proposals = result.report.proposals
    assert [p.reason.split(":")[0] for p in proposals] == [
        "invalid",
        "invalid",
        "invalid",
        "accepted",
    ]
    assert "not a JSON list" in proposals[0].reason and proposals[0].raw.startswith("Sure!")  # type: ignore[union-attr]
    assert (
        "drops placeholder" in proposals[1].reason and "invents placeholder" in proposals[2].reason
    )
    assert result.score == 1.0  # the leading brace was missing and it still parsed


async def test_same_seed_same_run_and_different_seeds_shuffle_differently() -> None:
    async def run(seed: int) -> tuple[list[list[str]], str]:
        data = arithmetic_examples(32)
        res = await optimize(
            qa_prompt(),
            data,
            metric=ExactMatch(),
            model=ArithmeticModel(),
            optimizer_model=ArithmeticCoach(),
            seed=seed,
        )
        return [s.batch_ids for s in res.report.steps], res.report.to_json(sort_keys=True).split(
            '"wall_time"'
        )[0]

    a, b, c = await run(1), await run(1), await run(2)
    assert a == b
    assert a[0] != c[0]


async def test_concurrent_runs_do_not_interfere() -> None:
    async def run(habits: tuple[str, ...], seed: int) -> object:
        return await optimize(
            qa_prompt(),
            arithmetic_examples(24, seed=seed),
            metric=ExactMatch(),
            model=ArithmeticModel(habits=habits),
            optimizer_model=ArithmeticCoach(),
            seed=seed,
        )

    alone = [await run(("chatty",), 1), await run(("spelled", "sloppy"), 2)]
    together: list[object] = [None, None]

    async def slot(i: int, habits: tuple[str, ...], seed: int) -> None:
        together[i] = await run(habits, seed)

    async with anyio.create_task_group() as tg:
        tg.start_soon(slot, 0, ("chatty",), 1)
        tg.start_soon(slot, 1, ("spelled", "sloppy"), 2)
    for a, t in zip(alone, together, strict=True):
        assert a.prompt == t.prompt and a.score == t.score  # type: ignore[attr-defined]
        assert a.report.decisions() == t.report.decisions()  # type: ignore[attr-defined]


async def test_budget_cap_stops_cleanly_with_the_best_prompt_so_far() -> None:
    data = arithmetic_examples(40)
    result = await optimize(
        qa_prompt(),
        data,
        metric=ExactMatch(),
        model=ArithmeticModel(),
        optimizer_model=ArithmeticCoach(),
        budget=Budget(max_calls=60),
    )
    report = result.report
    assert report.stopped_reason.startswith("budget: call budget reached")
    assert sum(report.calls.values()) <= 60 + 32  # at most the calls already in flight
    assert result.score == report.best_score and not result.score < report.initial_score


async def test_money_budget_needs_a_price_for_every_model() -> None:
    model = ArithmeticModel()
    with pytest.raises(ConfigError, match="price"):
        await optimize(
            qa_prompt(),
            arithmetic_examples(8),
            metric=ExactMatch(),
            model=model,
            optimizer_model=ArithmeticCoach(),
            budget=Budget(max_cost=1.0),
        )
    assert model.calls == 0


async def test_inputs_are_never_mutated() -> None:
    data = arithmetic_examples(16)
    snapshot = list(data)
    prompt = qa_prompt()
    before = prompt.hash
    await optimize(
        prompt,
        data,
        metric=ExactMatch(),
        model=ArithmeticModel(),
        optimizer_model=ArithmeticCoach(),
    )
    assert data == snapshot and prompt.hash == before


async def test_parallel_proposals_validate_concurrently_and_keep_the_best() -> None:
    n = 12
    order = TableTask(n, {}).order()
    task = TableTask(n, {0: set(), 1: set(order[:4]), 2: set(range(n))})
    stages = Stages([level_prompt(1), level_prompt(2)])
    result = await run_table(task, stages, parallel_proposals=2)
    first = result.report.steps[0].proposals  # type: ignore[attr-defined]
    assert [p.variant for p in first] == [0, 1]
    assert [p.accepted for p in first] == [False, True]
    assert first[0].reason == "beaten by a parallel proposal"
    assert result.score == 1.0  # type: ignore[attr-defined]


async def test_optimize_takes_one_settings_value_and_refuses_a_conflicting_keyword() -> None:
    """``settings=TrainerSettings(...)`` runs exactly as its keywords would; a keyword
    away from its default that disagrees with it is a `ConfigError` before any call."""

    async def run(**kwargs: object) -> list[list[str]]:
        result = await optimize(
            qa_prompt(),
            arithmetic_examples(32),
            metric=ExactMatch(),
            model=ArithmeticModel(),
            optimizer_model=ArithmeticCoach(),
            **kwargs,  # type: ignore[arg-type]
        )
        assert result.report.settings["batch_size"] == 8
        return [s.batch_ids for s in result.report.steps]

    by_keywords = await run(batch_size=8, seed=3)
    settings = TrainerSettings(batch_size=8, seed=3)
    assert await run(settings=settings) == by_keywords
    assert await run(settings=settings, batch_size=8) == by_keywords  # agreeing: fine
    model = ArithmeticModel()
    with pytest.raises(ConfigError, match=r"batch_size=2 \(settings has 8\), seed=7"):
        await optimize(
            qa_prompt(), arithmetic_examples(8), metric=ExactMatch(), model=model,
            optimizer_model=ArithmeticCoach(), settings=settings, batch_size=2, seed=7,
        )  # fmt: skip
    assert model.calls == 0
