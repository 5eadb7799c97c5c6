"""Making and judging proposals: the apply stage, validation, and the two-stage test.

One attempt of a step makes ``parallel_proposals`` candidates from the same feedback,
validates each (placeholders, response format), scores each on the batch, and only a
batch winner on the whole training set (racing against the best score).  Decisions use
conservative scores.  The apply history records what was learned in text that is the
same with racing on or off: a full-set loser is "below the best", never its exact
score (which racing does not know), so racing changes cost, never what a stage sees.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._concurrency import run_all
from ._errors import ConfigError, ProviderError
from ._outcome import Outcome
from ._prompt import Prompt
from ._types import Example
from .report import ProposalRecord
from .stages import (
    ApplyContext,
    HistoryEntry,
    ProposalError,
    escape_surrogates,
    validate_proposal,
)

if TYPE_CHECKING:
    from ._trainer import _Trainer

__all__ = ["Proposer", "best_accepted", "undecided"]

NO_BATCH_IMPROVEMENT = "no batch improvement"


def best_accepted(proposals: Sequence[ProposalRecord]) -> ProposalRecord | None:
    """The accepted proposal with the highest full score, the lowest variant on ties;
    every other accepted one is marked as beaten."""
    accepted = [p for p in proposals if p.accepted]
    if not accepted:
        return None
    winner = max(accepted, key=lambda p: (p.full_score or 0.0, -p.variant))
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
        trainer: _Trainer,
        batch: list[Example],
        batch_score: float,
        history: deque[HistoryEntry],
    ) -> None:
        self.trainer = trainer
        self.batch = batch
        self.batch_score = batch_score  # the best prompt's conservative score on the batch
        self.history = history
        # the full-set outcomes of this attempt's accepted proposals, by variant
        self.full_outcomes: dict[int, tuple[Outcome, ...]] = {}

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
        self._remember(records)
        return records

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
            trainer.task_description, trainer.best, feedback, history, record.variant
        )
        try:
            proposal = await trainer.parts.apply(ctx)
            trainer.stage_worked.add("apply")
            if not isinstance(proposal, Prompt):
                raise ProposalError(
                    f"the apply stage returned a {type(proposal).__name__}, not a Prompt",
                    raw=repr(proposal)[:2000],
                )
            record.prompt = proposal.to_dict()
            validate_proposal(proposal, trainer.best)
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
        """Score on the batch; a batch winner on the whole training set."""
        trainer = self.trainer
        on_batch = await trainer.evaluate(candidate, self.batch)
        record.batch_score, record.batch_errors = on_batch.conservative_score, on_batch.errors
        if not on_batch.conservative_score > self.batch_score:
            record.reason = NO_BATCH_IMPROVEMENT
            return
        await trainer.refresh_best()  # compare with today's number, not a stale error
        bar = trainer.best_score
        must_beat = bar if trainer.racing else None
        full = await trainer.evaluate(candidate, trainer.parts.trainset, must_beat=must_beat)
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
        if full.conservative_score > bar:
            # no error-rate stop here: this decision already counts errors as failures
            record.accepted = True
            record.reason = "accepted"
            self.full_outcomes[record.variant] = full.outcomes
        else:
            record.reason = f"no full-set improvement: {full.conservative_score:.4f} <= {bar:.4f}"

    def _remember(self, records: list[ProposalRecord]) -> None:
        """History in variant order, so k = 1 and k > 1 read it the same way."""
        bar = self.trainer.best_score
        for record in records:
            if record.prompt is None or record.reason.startswith("invalid"):
                continue
            prompt = Prompt.from_dict(record.prompt)
            if record.reason == NO_BATCH_IMPROVEMENT:
                entry = HistoryEntry(prompt, 0.0, "scored 0: no improvement on the batch")
            elif record.accepted:
                assert record.full_score is not None
                entry = HistoryEntry(prompt, record.full_score, "")
            else:  # the same text whether racing cut it or it ran to the end
                entry = HistoryEntry(
                    prompt, bar, f"below the best ({bar:.3f}) on the full training set"
                )
            self.history.append(entry)
