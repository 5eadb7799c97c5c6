"""Tests written to kill single-line mutations of the core that once survived (issue #15).

Each test names the line it guards; `scripts/mutations.py` applies each mutation and
checks that a test fails (TESTING.md records the run).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from engine import (
    ApplyContext,
    BadRequestError,
    Cache,
    Example,
    GradientContext,
    Prompt,
    evaluate,
    optimize,
)
from engine.metrics import ExactMatch
from engine.testing import ScriptedModel, ScriptedRequest

from .conftest import echo_examples, echo_model, qa_prompt

DESCRIPTIONS = {"task_description": "Say ok.", "metric_description": "ok scores 1."}


def _level(level: int) -> Prompt:
    return Prompt(
        [{"role": "system", "content": f"level {level}"}, {"role": "user", "content": "{q}"}],
        model="m",
    )


def _data(n: int) -> list[Example]:
    return [Example({"q": f"x{i}"}, "ok", id=f"x{i}") for i in range(n)]


class _Table:
    """Answers from a table: prompt level -> the example numbers it gets right; an
    optional set of (level, number) pairs the provider rejects (400)."""

    def __init__(
        self, right: dict[int, set[int]], rejected: frozenset[tuple[int, int]] = frozenset()
    ) -> None:
        self.right, self.rejected = right, rejected
        self.model = ScriptedModel(self._answer, name="table")

    def _answer(self, request: ScriptedRequest) -> str:
        level = int(request.messages[0]["content"].split()[-1])
        number = int(request.messages[-1]["content"][1:])
        if (level, number) in self.rejected:
            raise BadRequestError("rejected", status=400)
        return "ok" if number in self.right[level] else "no"


async def _feedback(ctx: GradientContext) -> str:
    return "do better"


def _proposing(*levels: int):  # type: ignore[no-untyped-def]
    queue = list(levels)

    async def apply(ctx: ApplyContext) -> Prompt:
        return _level(queue.pop(0) if len(queue) > 1 else queue[0])

    return apply


async def _optimize(task: _Table, apply: object, n: int, **kwargs: object):  # type: ignore[no-untyped-def]
    return await optimize(
        _level(0),
        _data(n),
        metric=ExactMatch(),
        model=task.model,
        optimizer_model=ScriptedModel(lambda r: "unused"),
        gradient=_feedback,
        apply=apply,  # type: ignore[arg-type]
        **{**DESCRIPTIONS, **kwargs},  # type: ignore[arg-type]
    )


async def test_a_tie_on_the_full_set_is_not_an_improvement() -> None:
    """_proposals: ``full.conservative_score > bar``.  Level 1 wins the batch but ties
    level 0 on the whole set (with racing off, so the full evaluation runs to the end):
    rejected, not accepted."""
    n = 8
    order = list(range(n))
    random.Random(42).shuffle(order)  # the trainer's own shuffle with the default seed
    first_batch, rest = set(order[:4]), set(order[4:])
    # level 0 is wrong on the first batch, level 1 on the rest: 4 of 8 each
    task = _Table({0: rest, 1: first_batch})
    result = await _optimize(
        task, _proposing(1), n, racing=False, batch_size=4, max_proposals_per_step=1
    )
    proposal = result.report.proposals[0]
    assert proposal.full_score == result.report.initial_score == 0.5
    assert not proposal.accepted and proposal.reason.startswith("no full-set improvement")
    assert result.prompt == _level(0)


async def test_a_candidate_winning_only_by_its_errors_is_rejected_on_the_full_set() -> None:
    """_proposals: acceptance on the conservative score.  Level 1 is right on the whole
    first batch and errors on every other example: its mean over scored examples is
    1.0, its conservative score 4/8, a tie with level 0's: rejected."""
    n = 8
    order = list(range(n))
    random.Random(42).shuffle(order)
    first_batch, rest = set(order[:4]), set(order[4:])
    task = _Table({0: rest, 1: first_batch}, rejected=frozenset((1, i) for i in rest))
    result = await _optimize(
        task,
        _proposing(1),
        n,
        batch_size=4,
        max_proposals_per_step=1,
        max_error_rate=1.0,
        racing=False,  # the full evaluation runs to its end: the decision is on its score
    )
    proposal = result.report.proposals[0]
    assert proposal.full_mean == 1.0 and proposal.full_errors == 4
    assert proposal.full_score == 0.5 and not proposal.accepted
    assert result.prompt == _level(0)


async def test_a_batch_with_an_error_is_not_perfect() -> None:
    """_trainer: ``record.perfect = current.errors == 0``.  Every scored example of the
    batch is right but one errored: nothing to learn from, and not "perfect"."""
    n = 4
    task = _Table({0: set(range(n))}, rejected=frozenset({(0, 2)}))
    result = await _optimize(task, _proposing(0), n, batch_size=4, max_error_rate=0.5)
    step = result.report.steps[0]
    assert step.batch_errors == 1 and not step.perfect and step.proposals == []


async def test_parallel_winners_tied_on_the_full_set_go_to_the_first_variant() -> None:
    """_proposals.best_accepted: ties break to the lowest variant.  Both parallel
    proposals are accepted with the same full score; variant 0 wins."""
    n = 8
    task = _Table({0: set(), 1: set(range(n)), 2: set(range(n))})

    async def by_variant(ctx: ApplyContext) -> Prompt:
        return _level(1 + ctx.variant)

    result = await _optimize(
        task, by_variant, n, parallel_proposals=2, batch_size=8, max_proposals_per_step=1
    )
    first, second = result.report.proposals
    assert first.full_score == second.full_score == 1.0
    assert first.accepted and not second.accepted
    assert second.reason == "beaten by a parallel proposal"
    assert result.prompt == _level(1)


async def test_an_async_outcome_callback_is_awaited_for_every_example() -> None:
    """_evaluate: ``await maybe``: an async on_outcome runs to its end for each one."""
    seen: list[str] = []

    async def record(outcome: object) -> None:
        import anyio

        await anyio.lowlevel.checkpoint()
        seen.append(outcome.example_id)  # type: ignore[attr-defined]

    await evaluate(
        qa_prompt(), echo_examples(12), model=echo_model(), metric=ExactMatch(), on_outcome=record
    )
    assert sorted(seen) == sorted(f"e{i}" for i in range(12))


async def test_two_metrics_on_one_cache_keep_their_own_results() -> None:
    """_cache: the metric identity is part of the metric-result key.  Two metrics that
    score the same predictions differently each get their own results."""

    def always(example: Example, prediction: str) -> float:
        return 1.0

    def never(example: Example, prediction: str) -> float:
        return 0.0

    always.inline = never.inline = True  # type: ignore[attr-defined]
    cache, data = Cache(), echo_examples(5)
    one = await evaluate(qa_prompt(), data, model=echo_model(), metric=always, cache=cache)
    two = await evaluate(qa_prompt(), data, model=echo_model(), metric=never, cache=cache)
    assert (one.score, two.score) == (1.0, 0.0)


def _scores(results: Sequence[object]) -> list[float]:
    return [r.score for r in results]  # type: ignore[attr-defined]


def test_every_mutation_of_the_run_still_applies() -> None:
    """Each mutation's line stands exactly once in its file, and the tests it names exist:
    a refactor that moves a guarded line must move the mutation with it, or the mutation
    run reports it as a survivor instead of testing it."""
    import importlib.util
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("mutations", root / "scripts/mutations.py")
    assert spec is not None and spec.loader is not None
    mutations = importlib.util.module_from_spec(spec)
    sys.modules["mutations"] = mutations  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(mutations)
    finally:
        del sys.modules["mutations"]
    assert len(mutations.MUTATIONS) >= 23
    for mutation in mutations.MUTATIONS:
        source = (root / mutation.path).read_text()
        assert source.count(mutation.old) == 1, mutation.name
        assert mutation.old != mutation.new, mutation.name
        assert all((root / test).is_file() for test in mutation.tests), mutation.name
