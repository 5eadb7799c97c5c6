"""Selection policies (issue 22): greedy stays the seed's rule; accept on validation;
the Pareto pool; tie-breaks by cost and length; patience."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from adapters import ScriptedModel, ScriptedRequest
from engine import (
    ApplyContext,
    Budget,
    Cache,
    ConfigError,
    Example,
    GradientContext,
    Prompt,
    optimize,
)
from engine.metrics import ExactMatch
from engine.training._selection import Candidate, ParetoPool

DESCRIPTIONS = {"task_description": "Say ok.", "metric_description": "ok scores 1."}


def level_prompt(level: int, padding: int = 0) -> Prompt:
    return Prompt(
        [
            {"role": "system", "content": f"level {level}" + " please" * padding},
            {"role": "user", "content": "{question}"},
        ],
        model="table",
    )


class LevelTask:
    """A task model answering from a table: prompt level -> example ids it gets right."""

    def __init__(self, train: int, val: int, table: dict[int, set[str]]) -> None:
        self.train = [Example({"question": f"t{i}"}, "ok", id=f"t{i}") for i in range(train)]
        self.val = [Example({"question": f"v{i}"}, "ok", id=f"v{i}") for i in range(val)]
        self.table = table
        self.model = ScriptedModel(self._answer, name="table")

    def _answer(self, request: ScriptedRequest) -> str:
        match = re.search(r"level (\d+)", request.messages[0]["content"])
        assert match is not None
        return "ok" if request.messages[-1]["content"] in self.table[int(match.group(1))] else "no"


class LevelStages:
    """Scripted stages: the apply stage returns the listed prompts in turn (the last one
    again when they run out)."""

    def __init__(self, proposals: Sequence[Prompt]) -> None:
        self.proposals = list(proposals)
        self.applied: list[ApplyContext] = []

    async def gradient(self, ctx: GradientContext) -> str:
        return f"fix {ctx.example.id}"

    async def apply(self, ctx: ApplyContext) -> Prompt:
        self.applied.append(ctx)
        return self.proposals[min(len(self.applied), len(self.proposals)) - 1]


async def run_levels(
    task: LevelTask, stages: LevelStages, prompt: Prompt | None = None, **kwargs: object
) -> object:
    return await optimize(
        prompt or level_prompt(0),
        task.train,
        valset=task.val,
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=stages.gradient,
        apply=stages.apply,
        **{**DESCRIPTIONS, **kwargs},  # type: ignore[arg-type]
    )


def ids(prefix: str, n: int) -> set[str]:
    return {f"{prefix}{i}" for i in range(n)}


# -- greedy, the default --------------------------------------------------------------
async def test_explicit_defaults_make_the_same_run_as_none_given() -> None:
    """selection="greedy", accept_on="train", no tie-break, no patience: the same
    decisions, prompt, scores and paid calls as a run that names none of them."""
    table = {0: ids("t", 4), 1: ids("t", 8), 2: ids("t", 12) | ids("v", 2), 3: ids("t", 6)}
    runs = []
    for explicit in (False, True):
        task = LevelTask(16, 4, table)
        stages = LevelStages([level_prompt(3), level_prompt(1), level_prompt(2)])
        extra = (
            {"selection": "greedy", "accept_on": "train", "tie_break": (), "patience": None}
            if explicit
            else {}
        )
        result = await run_levels(task, stages, **extra)
        runs.append((result, task.model.calls, [c.prompt for c in stages.applied]))
    (plain, plain_calls, plain_seen), (named, named_calls, named_seen) = runs
    assert plain.report.decisions() == named.report.decisions()  # type: ignore[attr-defined]
    assert plain.prompt == named.prompt and plain.score == named.score  # type: ignore[attr-defined]
    assert plain_calls == named_calls and plain_seen == named_seen
    assert plain.report.judged_on == "train" and plain.report.pool == []  # type: ignore[attr-defined]
    assert any(p.accepted for p in plain.report.proposals)  # type: ignore[attr-defined]


# -- accept on validation -------------------------------------------------------------
async def test_accept_on_val_returns_the_best_prompt_on_validation() -> None:
    """Level 1 memorizes the training set (1.0 there, 0 on val); level 2 helps the batch
    and half of val.  Greedy-on-train ships level 1; accept_on="val" ships level 2."""
    table = {0: set(), 1: ids("t", 16), 2: ids("t", 16) - ids("t", 6) | ids("v", 4)}
    table[2] |= ids("t", 16)  # level 2 fixes every batch too: only val tells them apart
    table[2] -= ids("t", 2)  # ... and is a little worse on train than level 1
    greedy = await run_levels(
        LevelTask(16, 8, table), LevelStages([level_prompt(1), level_prompt(2)])
    )
    assert greedy.prompt == level_prompt(1) and greedy.val_score == 0.0  # type: ignore[attr-defined]
    task = LevelTask(16, 8, table)
    stages = LevelStages([level_prompt(1), level_prompt(2)])
    on_val = await run_levels(task, stages, accept_on="val")
    report = on_val.report  # type: ignore[attr-defined]
    assert on_val.prompt == level_prompt(2)  # type: ignore[attr-defined]
    assert on_val.score == on_val.val_score == 0.5  # type: ignore[attr-defined]
    assert report.judged_on == "val" and report.val_score == 0.5
    first = report.proposals[0]
    assert first.reason.startswith("no full-set improvement") and first.full_score == 0.0
    assert "judged on val" in report.to_markdown()
    # the history the apply stage saw names the set the loser was judged on
    assert "on the validation set" in stages.applied[1].history[0].heading()


async def test_accept_on_val_racing_changes_cost_not_decisions() -> None:
    """Level 1 fixes the batch but cannot beat the initial prompt on validation: racing
    cuts its run there; the decisions are those of the full runs."""
    table = {0: ids("v", 10), 1: ids("t", 16) | {"v0"}, 2: ids("t", 16) | ids("v", 16)}
    runs = {}
    for racing in (True, False):
        task = LevelTask(16, 20, table)
        stages = LevelStages([level_prompt(1), level_prompt(2)])
        result = await run_levels(task, stages, accept_on="val", racing=racing)
        runs[racing] = (result, task.model.calls)
    (raced, raced_calls), (full, full_calls) = runs[True], runs[False]
    assert raced.report.decisions() == full.report.decisions()  # type: ignore[attr-defined]
    assert raced.prompt == full.prompt == level_prompt(2)  # type: ignore[attr-defined]
    assert raced_calls < full_calls and raced.report.raced_evaluations >= 1  # type: ignore[attr-defined]


# -- configuration --------------------------------------------------------------------
@pytest.mark.parametrize(
    "setting",
    [{"selection": "pareto"}, {"accept_on": "val"}, {"patience": 2}],
)
async def test_policies_that_read_validation_need_a_valset_before_any_call(
    setting: dict[str, object],
) -> None:
    task = LevelTask(8, 0, {0: set()})
    optimizer = ScriptedModel(lambda r: "unused")
    with pytest.raises(ConfigError, match="valset"):
        await optimize(
            level_prompt(0),
            task.train,
            metric=ExactMatch(),
            model=task.model,
            optimizer_model=optimizer,
            **setting,  # type: ignore[arg-type]
        )
    assert task.model.calls == 0 and optimizer.calls == 0


@pytest.mark.parametrize(
    "setting",
    [
        {"selection": "best"},
        {"accept_on": "test"},
        {"tie_break": ("speed",)},
        {"tie_break": "length"},
        {"patience": 0},
        {"merge": True},  # greedy has no front to merge
    ],
)
async def test_bad_selection_settings_are_config_errors(setting: dict[str, object]) -> None:
    task = LevelTask(8, 4, {0: set()})
    with pytest.raises(ConfigError):
        await run_levels(task, LevelStages([level_prompt(0)]), **setting)
    assert task.model.calls == 0


# -- tie-break ------------------------------------------------------------------------
async def test_tie_break_by_length_ships_the_shorter_prompt_of_equal_score() -> None:
    """Level 1 scores exactly what the long initial prompt scores: the seed's rule keeps
    the older prompt; tie_break=("length",) takes the shorter one (racing on: a
    candidate that can still tie is not cut)."""
    table = {0: ids("t", 8), 1: ids("t", 8)}
    long_prompt = level_prompt(0, padding=40)
    seed_rule = await run_levels(
        LevelTask(16, 4, table), LevelStages([level_prompt(1)]), prompt=long_prompt
    )
    assert seed_rule.prompt == long_prompt  # type: ignore[attr-defined]
    assert not any(p.accepted for p in seed_rule.report.proposals)  # type: ignore[attr-defined]
    tied = await run_levels(
        LevelTask(16, 4, table),
        LevelStages([level_prompt(1)]),
        prompt=long_prompt,
        tie_break=("length",),
    )
    assert tied.prompt == level_prompt(1) and tied.score == seed_rule.score  # type: ignore[attr-defined]
    accepted = [p for p in tied.report.proposals if p.accepted]  # type: ignore[attr-defined]
    assert len(accepted) == 1 and accepted[0].length is not None and accepted[0].length < 40
    assert "prompt tokens" in tied.report.to_markdown()  # type: ignore[attr-defined]


# -- patience -------------------------------------------------------------------------
async def test_patience_stops_after_steps_without_a_validation_improvement() -> None:
    table = {0: ids("t", 2), 1: set()}
    task = LevelTask(24, 4, table)
    result = await run_levels(task, LevelStages([level_prompt(1)]), patience=2)
    report = result.report  # type: ignore[attr-defined]
    assert len(report.steps) == 2
    assert report.stopped_reason == "patience: 2 steps without a validation improvement"
    without = await run_levels(LevelTask(24, 4, table), LevelStages([level_prompt(1)]))
    assert len(without.report.steps) == 6  # type: ignore[attr-defined]


# -- the Pareto pool ------------------------------------------------------------------
SKILLS = "abcdef"
CAPACITY = 2  # a prompt states at most two skills: learning one may forget another


def skills_prompt(skills: Sequence[str]) -> Prompt:
    return Prompt(
        [
            {"role": "system", "content": "skills: " + " ".join(skills)},
            {"role": "user", "content": "{question}"},
        ],
        model="skills",
    )


def skill_examples(prefix: str, n: int) -> list[Example]:
    return [
        Example(
            {"question": f"{prefix}{i} needs {SKILLS[i % len(SKILLS)]}"}, "ok", id=f"{prefix}{i}"
        )
        for i in range(n)
    ]


def skill_answer(request: ScriptedRequest) -> str:
    known = request.messages[0]["content"].split(":", 1)[1].split()
    return "ok" if request.messages[-1]["content"].split()[-1] in known else "no"


async def skill_gradient(ctx: GradientContext) -> str:
    return "needs " + str(ctx.example.inputs["question"]).split()[-1]


async def skill_apply(ctx: ApplyContext) -> Prompt:
    """Learn the variant's requested skill; keep the newest CAPACITY skills."""
    known = ctx.prompt.messages[0]["content"].split(":", 1)[1].split()
    wanted = ctx.feedback[ctx.variant % len(ctx.feedback)].split()[-1]
    return skills_prompt([*[s for s in known if s != wanted], wanted][-CAPACITY:])


async def run_skills(
    model: ScriptedModel, cache: Cache | None = None, train: int = 24, **kwargs: object
) -> object:
    return await optimize(
        skills_prompt([]),
        skill_examples("t", train),
        valset=skill_examples("v", 12),
        metric=ExactMatch(),
        model=model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        cache=cache,
        **{
            "gradient": skill_gradient,
            "apply": skill_apply,
            "selection": "pareto",
            **DESCRIPTIONS,
            **kwargs,
        },  # type: ignore[arg-type]
    )


def pool_view(report: object) -> list[tuple[int, list[int], str, bool, list[str]]]:
    return [
        (c.id, c.parents, c.prompt["messages"][0]["content"], c.on_front, c.leads)
        for c in report.pool  # type: ignore[attr-defined]
    ]


async def test_pareto_run_keeps_a_front_and_is_reproducible() -> None:
    """Same seed, same pool, parents and result; the front holds candidates that lead
    different validation examples, and the report says racing is off."""
    first = await run_skills(ScriptedModel(skill_answer, name="skills"), seed=7)
    again = await run_skills(ScriptedModel(skill_answer, name="skills"), seed=7)
    report = first.report  # type: ignore[attr-defined]
    assert pool_view(report) == pool_view(again.report)  # type: ignore[attr-defined]
    assert first.prompt == again.prompt and report.decisions() == again.report.decisions()  # type: ignore[attr-defined]
    front = [c for c in report.pool if c.on_front]
    assert len(report.pool) >= 3 and len(front) >= 2
    led = [set(c.leads) for c in front]
    assert all(a != b for n, a in enumerate(led) for b in led[n + 1 :])  # each leads its own
    assert all(c.parents for c in report.pool[1:])  # every candidate names its parent
    # the returned prompt is the best mean on validation
    best = max(report.pool, key=lambda c: c.val_score)
    assert first.val_score == best.val_score == first.score  # type: ignore[attr-defined]
    assert any(n.startswith("racing off") for n in report.notes)
    assert report.raced_evaluations == 0 and report.judged_on == "val"
    text = report.to_markdown()
    assert "## Candidate pool" in text and "| #0 |" in text
    assert "Candidate pool" in report.to_html()
    other = await run_skills(ScriptedModel(skill_answer, name="skills"), seed=8)
    assert pool_view(other.report) != pool_view(report)  # type: ignore[attr-defined]


async def test_pareto_run_resumes_from_the_cache_without_paying_twice(tmp_path: Path) -> None:
    """A run stopped by a call budget, run again on the same SQLite cache, pays exactly
    what the uninterrupted run pays in total and ends with the same pool."""
    whole_model = ScriptedModel(skill_answer, name="skills")
    whole = await run_skills(whole_model, seed=3)
    path = str(tmp_path / "cache.sqlite")
    cut_model = ScriptedModel(skill_answer, name="skills")
    async with Cache.sqlite(path, flush_interval=0.01) as cache:
        cut = await run_skills(cut_model, cache, seed=3, budget=Budget(max_calls=60))
    assert cut.report.stopped_reason.startswith("budget")  # type: ignore[attr-defined]
    resumed_model = ScriptedModel(skill_answer, name="skills")
    async with Cache.sqlite(path, flush_interval=0.01) as cache:
        resumed = await run_skills(resumed_model, cache, seed=3)
    assert cut_model.calls + resumed_model.calls == whole_model.calls
    assert pool_view(resumed.report) == pool_view(whole.report)  # type: ignore[attr-defined]
    assert resumed.prompt == whole.prompt  # type: ignore[attr-defined]


def candidate(cid: int, scores: Sequence[float], key: tuple[float, ...] = ()) -> Candidate:
    return Candidate(
        id=cid,
        prompt=skills_prompt([str(cid)]),
        parents=(0,) if cid else (),
        scores=tuple(scores),
        mean=sum(scores) / len(scores),
        key=key,
        step=cid - 1,
    )


def test_front_drops_dominated_and_equal_candidates_and_weights_parents_by_leads() -> None:
    import random

    pool = ParetoPool(["x", "y", "z"], random.Random(1))
    assert pool.add(candidate(0, [1, 0, 0]))
    assert pool.add(candidate(1, [1, 1, 0]))  # dominates #0
    assert 0 not in pool.leads
    assert pool.add(candidate(2, [0, 0, 1]))
    assert not pool.add(candidate(3, [1, 1, 0]))  # equal to #1 and younger: dropped
    assert pool.leads == {1: [0, 1], 2: [2]}
    draws = [pool.sample_parent().id for _ in range(3000)]
    assert 0.6 < draws.count(1) / len(draws) < 0.73  # 2 of 3 led examples
    assert pool.best().id == 1
    # with a tie-break key (cost), an equal but cheaper newcomer replaces the older one
    keyed = ParetoPool(["x", "y"], random.Random(1))
    assert keyed.add(candidate(0, [1, 0], key=(5.0,)))
    assert keyed.add(candidate(1, [1, 0], key=(2.0,)))
    assert keyed.leads == {1: [0]} and keyed.best().id == 1


async def skill_apply_or_merge(ctx: ApplyContext) -> Prompt:
    """As `skill_apply`; a merge request keeps both prompts' skills (up to four)."""
    if not ctx.feedback[0].startswith("MERGE:"):
        return await skill_apply(ctx)
    other = re.search(r"## Other prompt\n\[system\] skills:(.*)", ctx.feedback[0])
    assert other is not None
    known = ctx.prompt.messages[0]["content"].split(":", 1)[1].split()
    merged = [*known, *[s for s in other.group(1).split() if s not in known]]
    return skills_prompt(merged[: 2 * CAPACITY])


async def test_pareto_merge_combines_two_front_members_that_share_an_ancestor() -> None:
    model = ScriptedModel(skill_answer, name="skills")
    result = await run_skills(model, train=60, seed=7, merge=True, apply=skill_apply_or_merge)
    report = result.report  # type: ignore[attr-defined]
    merges = [p for p in report.proposals if p.attempt == -1]
    assert merges and all(p.parents is not None and len(p.parents) == 2 for p in merges)
    pool = {c.id: c for c in report.pool}
    for p in merges:  # the two parents were front members with a common ancestor
        a, b = p.parents
        assert pool[a].parents and pool[b].parents
    joined = [p for p in merges if p.accepted]
    assert joined, "a merge of two skill sets leads the examples of both"
    plain = await run_skills(ScriptedModel(skill_answer, name="skills"), train=60, seed=7)
    assert result.val_score > plain.val_score  # type: ignore[attr-defined, operator]
