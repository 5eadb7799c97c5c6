"""Making and judging proposals: the apply stage, validation, and the two-stage test.

One attempt of a step makes ``parallel_proposals`` candidates from the same feedback,
validates each (placeholders, response format), scores each on the batch, and only a
batch winner on the whole judged set: the training set (racing against the best
score), the validation set with ``accept_on="val"``, or, with ``selection="pareto"``,
the whole validation set for the candidate pool (no racing).  Decisions use
conservative scores; equal scores go to the lower tie-break key when there is one.
The apply history records what was learned in text that is the
same with racing on or off: a full-set loser is "below the best", never its exact
score (which racing does not know), so racing changes cost, never what a stage sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

from .._budget import Price
from .._concurrency import run_all
from .._errors import ConfigError, ProviderError
from .._outcome import Evaluation, Outcome
from .._prompt import Prompt
from .._types import Example
from ..report import ProposalRecord, RunReport
from ..stages import (
    ApplyContext,
    ApplyStage,
    HistoryEntry,
    ProposalError,
    escape_surrogates,
    validate_proposal,
)
from ..tracing import span
from ._selection import (
    Candidate,
    ParetoPool,
    TieKey,
    cost_per_example,
    merge_feedback,
    prompt_length,
    racing_bar,
    record_key,
    wins,
)
from ._settings import TrainerSettings


class RunParts(Protocol):
    """What a proposer reads of the run's parts: its data and the apply stage."""

    @property
    def trainset(self) -> list[Example]: ...
    @property
    def valset(self) -> list[Example] | None: ...
    @property
    def apply(self) -> ApplyStage: ...


class TrainerState(Protocol):
    """What a proposer needs of the trainer (`_trainer._Trainer` is one): the best
    prompt and its bar, the run's settings, report and parts, and the calls it makes.
    A protocol, so this module never imports the trainer back."""

    best: Prompt
    best_score: float
    racing: bool
    task_description: str | None
    price: Price | None
    pool: ParetoPool | None
    stage_worked: set[str]

    @property
    def settings(self) -> TrainerSettings: ...
    @property
    def report(self) -> RunReport: ...
    @property
    def parts(self) -> RunParts: ...
    @property
    def judge_set(self) -> list[Example]: ...
    def key_of(self, prompt: Prompt, outcomes: Sequence[Outcome]) -> TieKey: ...
    def best_key(self) -> TieKey: ...
    def pool_candidate(
        self, prompt: Prompt, val: Evaluation, parents: tuple[int, ...], step: int
    ) -> Candidate: ...
    async def evaluate(
        self, prompt: Prompt, data: Sequence[Example], *, must_beat: float | None = None
    ) -> Evaluation: ...
    def stage_failed(self, stage: str, exc: ProviderError) -> None: ...
    async def refresh_best(self) -> None: ...


__all__ = ["Proposer", "best_accepted", "undecided"]

NO_BATCH_IMPROVEMENT = "no batch improvement"


def best_accepted(
    proposals: Sequence[ProposalRecord], tie_break: Sequence[str] = ()
) -> ProposalRecord | None:
    """The accepted proposal with the highest full score, then the lowest tie-break key,
    then the lowest variant; every other accepted one is marked as beaten."""
    accepted = [p for p in proposals if p.accepted]
    if not accepted:
        return None
    winner = min(
        accepted,
        key=lambda p: (-(p.full_score or 0.0), record_key(p, tie_break), p.variant),
    )
    for p in accepted:
        if p is not winner:
            p.accepted = False
            p.reason = "beaten by a parallel proposal"
    return winner


def undecided(proposals: Sequence[ProposalRecord], attempt: int, why: str) -> None:
    """Mark the proposals of an attempt the budget cut short: paid for, so reported,
    but none of them decided (an accepted one had not yet been compared with the others
    and did not become the best prompt)."""
    for p in proposals:
        if p.attempt != attempt:
            continue
        if p.accepted:
            p.accepted = False
            p.reason = f"not decided: the budget ran out ({why}) before the attempt's decision"
        elif not p.reason:
            p.reason = f"not judged: the budget ran out ({why})"


class Proposer:
    """The attempts of one step: propose, judge, remember."""

    def __init__(
        self,
        trainer: TrainerState,
        batch: list[Example],
        batch_score: float,
        history: deque[HistoryEntry],
        *,
        current: Prompt | None = None,
        parents: tuple[int, ...] | None = None,
        batch_key: TieKey = (),
    ) -> None:
        self.trainer = trainer
        self.batch = batch
        self.current = current if current is not None else trainer.best  # what is improved
        self.batch_score = batch_score  # the current prompt's conservative batch score
        self.batch_key = batch_key  # and its tie-break key there
        self.parents = parents  # pareto: the pool ids of the current prompt
        self.history = history
        # the full-set outcomes of this attempt's accepted proposals, by variant
        self.full_outcomes: dict[int, tuple[Outcome, ...]] = {}
        # pareto: this attempt's validation runs, added to the pool in variant order
        self.on_val: dict[int, tuple[Prompt, Evaluation]] = {}

    async def attempt(
        self,
        step: int,
        attempt: int,
        feedback: tuple[str, ...],
        into: list[ProposalRecord],
    ) -> list[ProposalRecord]:
        """Make and judge one attempt's proposals; they join ``into`` (the step's record)
        before anything is paid, so a budget stop midway still reports them."""
        parallel = self.trainer.settings.parallel_proposals
        records = [ProposalRecord(step, attempt, variant, None) for variant in range(parallel)]
        into.extend(records)
        snapshot = tuple(self.history)
        candidates = await run_all(
            [lambda r=r: self._propose(r, feedback, snapshot) for r in records]  # type: ignore[misc]
        )
        await run_all(
            [
                (lambda r=r, c=c: self._judge(r, c))  # type: ignore[misc]
                for r, c in zip(records, candidates, strict=True)
                if c is not None
            ]
        )
        self._join_pool(records)
        self._remember(records)
        return records

    async def merge(
        self,
        step: int,
        pair: tuple[Candidate, Candidate],
        ancestor: Candidate,
        into: list[ProposalRecord],
    ) -> ProposalRecord:
        """Pareto with ``merge=True``: one apply call asked to combine two front members
        (``current`` is the first; the feedback shows the second and their ancestor),
        judged like any candidate.  Its record has attempt -1."""
        record = ProposalRecord(step, -1, 0, None)
        into.append(record)
        feedback = (merge_feedback(pair[1].prompt, ancestor.prompt),)
        candidate = await self._propose(record, feedback, tuple(self.history))
        if candidate is not None:
            await self._judge(record, candidate)
        self._join_pool([record])
        self._remember([record])
        return record

    async def _propose(
        self,
        record: ProposalRecord,
        feedback: tuple[str, ...],
        history: tuple[HistoryEntry, ...],
    ) -> Prompt | None:
        """One apply call, validated; None (with the reason recorded) when unusable."""
        trainer = self.trainer
        assert trainer.task_description is not None
        ctx = ApplyContext(
            trainer.task_description, self.current, feedback, history, record.variant
        )
        record.parents = list(self.parents) if self.parents is not None else None
        try:
            with span("apply", **{"engine.proposal.variant": record.variant}):
                proposal = await trainer.parts.apply(ctx)
            trainer.stage_worked.add("apply")
            if not isinstance(proposal, Prompt):
                raise ProposalError(
                    f"the apply stage returned a {type(proposal).__name__}, not a Prompt",
                    raw=repr(proposal)[:2000],
                )
            record.prompt = proposal.to_dict()
            record.length = prompt_length(proposal)
            validate_proposal(proposal, self.current)
        except ProposalError as exc:
            record.reason = f"invalid: {exc.message}"
            record.raw = exc.raw
            return None
        except (ConfigError, UnicodeError) as exc:
            # a stage of the caller's building a Prompt from LLM text (braces, half an
            # emoji): an unusable proposal, a failed attempt like any other
            message = escape_surrogates(str(exc))
            record.prompt = None
            record.reason = f"invalid: the apply stage raised {type(exc).__name__}: {message}"
            return None
        except ProviderError as exc:
            if exc.fatal:
                raise
            record.reason = f"invalid: apply call failed: {exc.message}"
            trainer.stage_failed("apply", exc)
            return None
        return proposal

    async def _judge(self, record: ProposalRecord, candidate: Prompt) -> None:
        """Score on the batch; a batch winner on the whole judged set (or the pool's)."""
        trainer = self.trainer
        with span("batch check", **{"engine.proposal.variant": record.variant}):
            on_batch = await trainer.evaluate(candidate, self.batch)
        record.batch_score, record.batch_errors = on_batch.conservative_score, on_batch.errors
        record.cost = cost_per_example(on_batch.outcomes, trainer.price)
        key = trainer.key_of(candidate, on_batch.outcomes)
        if not wins(on_batch.conservative_score, key, self.batch_score, self.batch_key):
            record.reason = NO_BATCH_IMPROVEMENT
            return
        if trainer.pool is not None:
            await self._judge_on_val(record, candidate)
        else:
            await self._judge_full(record, candidate)

    async def _judge_on_val(self, record: ProposalRecord, candidate: Prompt) -> None:
        """Pareto: the whole validation set, every example (the pool needs each score);
        the pool decides in `_join_pool`, once the attempt's proposals are all judged."""
        trainer = self.trainer
        assert trainer.parts.valset is not None
        val = await trainer.evaluate(candidate, trainer.parts.valset)
        trainer.report.full_evaluations += 1
        record.full_score, record.full_mean = val.conservative_score, val.score
        record.full_errors = val.errors
        record.cost = cost_per_example(val.outcomes, trainer.price)
        self.on_val[record.variant] = (candidate, val)

    def _join_pool(self, records: list[ProposalRecord]) -> None:
        """Pareto: add the attempt's validated candidates in variant order (the same pool
        ids however the runs interleaved); those on the front are accepted."""
        pool = self.trainer.pool
        if pool is None:
            return
        for record in records:
            if record.variant not in self.on_val:
                continue
            candidate, val = self.on_val.pop(record.variant)
            entry = self.trainer.pool_candidate(
                candidate, val, tuple(self.parents or ()), record.step
            )
            record.candidate = entry.id
            if pool.add(entry):
                record.accepted = True
                record.reason = (
                    f"accepted: on the Pareto front, best on {len(pool.leads[entry.id])} "
                    "validation examples"
                )
            else:
                record.reason = "dominated: not the best on any validation example"

    async def _judge_full(self, record: ProposalRecord, candidate: Prompt) -> None:
        """Greedy: the whole judged set, racing against the best score."""
        trainer = self.trainer
        await trainer.refresh_best()  # compare with today's number, not a stale error
        bar = trainer.best_score
        tie_break = trainer.settings.tie_break
        must_beat = racing_bar(bar, tie_break) if trainer.racing else None
        with span("full-set check", **{"engine.proposal.variant": record.variant}):
            full = await trainer.evaluate(candidate, trainer.judge_set, must_beat=must_beat)
        trainer.report.full_evaluations += 1
        record.full_errors = full.errors
        if full.stopped_early:
            trainer.report.raced_evaluations += 1
            trainer.report.examples_skipped_by_racing += full.total - full.completed
            record.raced = {
                "completed": full.completed,
                "total": full.total,
                "upper_bound": full.upper_bound,
            }
            record.reason = (
                f"no full-set improvement: cut by racing after {full.completed}/{full.total} "
                f"(could reach at most {full.upper_bound:.4f} <= {bar:.4f})"
            )
            return
        record.full_score, record.full_mean = full.conservative_score, full.score
        record.cost = cost_per_example(full.outcomes, trainer.price)
        key = trainer.key_of(candidate, full.outcomes)
        if wins(full.conservative_score, key, bar, trainer.best_key()):
            # no error-rate stop here: this decision already counts errors as failures
            record.accepted = True
            record.reason = "accepted"
            self.full_outcomes[record.variant] = full.outcomes
        else:
            tie = " (a tie, not cheaper or shorter)" if full.conservative_score == bar else ""
            tie = tie if tie_break else ""
            record.reason = (
                f"no full-set improvement: {full.conservative_score:.4f} <= {bar:.4f}{tie}"
            )

    def _remember(self, records: list[ProposalRecord]) -> None:
        """History in variant order, so k = 1 and k > 1 read it the same way."""
        bar = self.trainer.best_score
        where = (
            "the full training set"
            if self.trainer.judge_set is self.trainer.parts.trainset
            else "the validation set"
        )
        for record in records:
            if record.prompt is None or record.reason.startswith("invalid"):
                continue
            prompt = Prompt.from_dict(record.prompt)
            if record.reason == NO_BATCH_IMPROVEMENT:
                entry = HistoryEntry(prompt, 0.0, "scored 0: no improvement on the batch")
            elif record.candidate is not None and not record.accepted:
                assert record.full_score is not None
                entry = HistoryEntry(prompt, record.full_score, "dominated on the validation set")
            elif record.accepted:
                assert record.full_score is not None
                entry = HistoryEntry(prompt, record.full_score, "")
            else:  # the same text whether racing cut it or it ran to the end
                entry = HistoryEntry(prompt, bar, f"below the best ({bar:.3f}) on {where}")
            self.history.append(entry)
