"""`Tally`: the running counts of one evaluation, and exact racing on them.

Scores are summed as exact fractions, so the result does not depend on the order in
which examples complete.  Racing uses the conservative rule that decisions use: an
errored example counts as a failure (0), so after ``k`` of ``N`` outcomes with score
sum ``s`` the best the evaluation can still reach is ``(s + (N - k)) / N``.
"""

from __future__ import annotations

from fractions import Fraction

from ._outcome import Outcome
from ._types import Usage

__all__ = ["Tally"]


class Tally:
    """Counts of one evaluation; owned by its workers on one event loop."""

    __slots__ = (
        "cache_hits",
        "calls",
        "completed",
        "errors",
        "must_beat",
        "retries",
        "score_sum",
        "scored",
        "stopped_early",
        "total",
        "upper_bound",
        "usage",
    )

    def __init__(self, total: int | None, must_beat: float | None) -> None:
        self.total = total  # examples in the dataset, when it has a length
        self.must_beat = Fraction(must_beat) if must_beat is not None else None
        self.completed = 0  # examples with an outcome
        self.scored = 0  # ... of which with a metric result
        self.errors = 0  # ... of which with an error
        self.score_sum = Fraction(0)
        self.calls = 0  # provider attempts paid for, retries included
        self.cache_hits = 0
        self.retries = 0
        self.usage = Usage()
        self.stopped_early = False
        self.upper_bound: Fraction | None = None  # set when racing cut the evaluation

    def add(self, outcome: Outcome) -> None:
        self.completed += 1
        if outcome.cached:
            self.cache_hits += 1
        if outcome.result is None:
            self.errors += 1
        else:
            self.scored += 1
            self.score_sum += Fraction(outcome.result.score)

    def paid(self, attempts: int, usage: Usage | None = None) -> None:
        """Count ``attempts`` provider calls for one prediction (and the tokens paid)."""
        self.calls += attempts
        self.retries += attempts - 1
        if usage is not None:
            self.usage = self.usage + usage

    def bound(self) -> Fraction | None:
        """The best conservative mean still reachable, or None without a known size."""
        if self.total is None or self.total <= 0:
            return None
        return (self.score_sum + (self.total - self.completed)) / self.total

    def cannot_win(self) -> bool:
        """Exact racing test: even with every remaining example perfect, not above?"""
        if self.must_beat is None:
            return False
        bound = self.bound()
        if bound is None or bound > self.must_beat:
            return False
        self.upper_bound = bound
        return True

    def mean(self) -> float:
        """Mean over scored examples (NaN when none): what reports show."""
        return float(self.score_sum / self.scored) if self.scored else float("nan")

    def conservative_mean(self) -> float:
        """Mean with errors counted as failures: what decisions use."""
        return float(self.score_sum / self.completed) if self.completed else float("nan")
