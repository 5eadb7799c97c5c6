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
from ._errors import ProviderError
from ._prompt import Prompt
from ._types import Example
from .report import ProposalRecord
from .stages import ApplyContext, HistoryEntry, ProposalError, validate_proposal
from .tracing import span

if TYPE_CHECKING:
    from ._trainer import _Trainer

__all__ = ["Proposer", "best_accepted"]

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

    async def attempt(
        self, step: int, attempt: int, feedback: tuple[str, ...]
    ) -> list[ProposalRecord]:
        parallel = self.trainer.settings.parallel_proposals
        records = [ProposalRecord(step, attempt, variant, None) for variant in range(parallel)]
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
            with span("apply", **{"engine.proposal.variant": record.variant}):
                proposal = await trainer.parts.apply(ctx)
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
        except ProviderError as exc:
            if exc.fatal:
                raise
            record.reason = f"invalid: apply call failed: {exc.message}"
            return None
        return proposal

    async def _judge(self, record: ProposalRecord, candidate: Prompt) -> None:
        """Score on the batch; a batch winner on the whole training set."""
        trainer = self.trainer
        with span("batch check", **{"engine.proposal.variant": record.variant}):
            on_batch = await trainer.evaluate(candidate, self.batch)
        record.batch_score, record.batch_errors = on_batch.conservative_score, on_batch.errors
        if not on_batch.conservative_score > self.batch_score:
            record.reason = NO_BATCH_IMPROVEMENT
            return
        bar = trainer.best_score
        must_beat = bar if trainer.racing else None
        with span("full-set check", **{"engine.proposal.variant": record.variant}):
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
            trainer.check_error_rate(full, "the accepted candidate on the training set")
            record.accepted = True
            record.reason = "accepted"
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
