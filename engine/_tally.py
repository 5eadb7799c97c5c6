"""`Tally`: the running counts of one evaluation, and exact racing on them.

Scores are summed as exact fractions, so the result does not depend on the order in
which examples complete.  Racing uses the conservative rule that decisions use: an
errored example counts as a failure (0), so after ``k`` of ``N`` outcomes with score
sum ``s`` the best the evaluation can still reach is ``(s + (N - k)) / N``.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from ._outcome import Outcome
from ._types import Usage

__all__ = ["Tally"]


class Tally:
    """Counts of one evaluation; owned by its workers on one event loop."""

    __slots__ = (
        "_fractional",
        "_ones",
        "cache_hits",
        "calls",
        "completed",
        "errors",
        "hedges",
        "must_beat",
        "retries",
        "scored",
        "stopped_early",
        "timeouts",
        "total",
        "truncated",
        "upper_bound",
        "usage",
    )

    def __init__(self, total: int | None, must_beat: float | None) -> None:
        self.total = total  # examples in the dataset, when it has a length
        self.must_beat = Fraction(must_beat) if must_beat is not None else None
        self.completed = 0  # examples with an outcome
        self.scored = 0  # ... of which with a metric result
        self.errors = 0  # ... of which with an error
        self._ones = 0  # scores of exactly 1 (most metrics are 0/1): counted, not summed
        self._fractional = Fraction(0)  # every other score, summed exactly
        self.calls = 0  # provider attempts paid for, retries included
        self.cache_hits = 0
        self.retries = 0
        self.timeouts = 0  # attempts that timed out (each also a retry, or the last try)
        self.truncated = 0  # answers cut at the length cap (finish_reason "length")
        self.hedges = 0  # duplicate attempts sent by hedging (in ``calls``, not retries)
        self.usage = Usage()
        self.stopped_early = False
        self.upper_bound: Fraction | None = None  # set when racing cut the evaluation

    def add(self, outcome: Outcome) -> None:
        self.completed += 1
        if outcome.cached:
            self.cache_hits += 1
        if outcome.truncated:
            self.truncated += 1
        if outcome.result is None:
            self.errors += 1
        else:
            self.scored += 1
            score = outcome.result.score
            if score == 1.0:
                self._ones += 1
            elif score != 0.0:
                self._fractional += Fraction(score)

    @property
    def score_sum(self) -> Fraction:
        """The exact sum of the scores so far (independent of completion order)."""
        return self._fractional + self._ones

    def paid(
        self, attempts: int, usage: Usage | None = None, timeouts: int = 0, hedges: int = 0
    ) -> None:
        """Count ``attempts`` provider calls for one prediction (and the tokens paid),
        ``timeouts`` of which timed out and ``hedges`` were duplicates sent by hedging."""
        self.calls += attempts
        self.retries += attempts - 1 - hedges
        self.timeouts += timeouts
        self.hedges += hedges
        if usage is not None:
            self.usage = self.usage + usage

    def bound(self) -> Fraction | None:
        """The best conservative mean still reachable, or None without a known size."""
        if self.total is None or self.total <= 0:
            return None
        return (self.score_sum + (self.total - self.completed)) / self.total

    def cannot_win(self) -> bool:
        """Exact racing test: even with every remaining example perfect, not above?"""
        must_beat, total = self.must_beat, self.total
        if must_beat is None or total is None or self.completed >= total:
            return False  # nothing left to save: the evaluation is complete anyway
        # bound <= must_beat, multiplied out: integers unless a score was fractional
        reachable = self._ones + (total - self.completed) + self._fractional
        if reachable > must_beat * total:
            return False
        self.upper_bound = Fraction(reachable) / total
        return True

    def counts(self) -> dict[str, Any]:
        """The counts an `Evaluation` reports (``total``: the examples seen when the
        dataset had no length)."""
        return {
            "total": self.total if self.total is not None else self.completed,
            "completed": self.completed,
            "scored": self.scored,
            "errors": self.errors,
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "retries": self.retries,
            "hedges": self.hedges,
            "usage": self.usage,
            "timeouts": self.timeouts,
            "truncated": self.truncated,
        }

    def progress(self) -> dict[str, Any]:
        """The counts an ``evaluation.progress`` event carries."""
        return {
            "done": self.completed,
            "total": self.total,
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "errors": self.errors,
            "retries": self.retries,
            "timeouts": self.timeouts,
            "truncated": self.truncated,
            "tokens": self.usage.total_tokens,
        }

    def mean(self) -> float:
        """Mean over scored examples (NaN when none): what reports show."""
        return float(self.score_sum / self.scored) if self.scored else float("nan")

    def conservative_mean(self) -> float:
        """Mean with errors counted as failures: what decisions use."""
        return float(self.score_sum / self.completed) if self.completed else float("nan")
