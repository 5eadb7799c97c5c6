"""What an evaluation produces: one `Outcome` per example and the `Evaluation` summary."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._types import ErrorInfo, MetricResult, ProgramCall, Usage

__all__ = ["Evaluation", "GlobalMetric", "Outcome"]

GlobalMetric = Callable[[Sequence[MetricResult]], float]
"""Aggregates per-example results into one score in [0, 1] (the mean by default).

It receives results in dataset order.  For the *conservative* score an errored example
is passed as ``MetricResult(0.0, feedback="error: ...", trace={"error": True})``.
"""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one example: a metric result, or an error; never both.

    ``trace``: a program's ``lm`` calls on this example, in order (empty for a prompt).
    ``truncated``: the answer was cut at the length cap (finish reason ``length``).
    """

    index: int
    example_id: str
    prediction: str | None
    result: MetricResult | None
    error: ErrorInfo | None
    cached: bool
    usage: Usage = field(default_factory=Usage)
    trace: tuple[ProgramCall, ...] = ()
    truncated: bool = False

    @property
    def score(self) -> float | None:
        return self.result.score if self.result is not None else None

    def to_dict(self) -> dict[str, Any]:
        data = self._fields()
        if self.trace:  # a prompt's outcome reads exactly as before programs existed
            data["trace"] = [call.to_dict() for call in self.trace]
        return data

    def _fields(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.example_id,
            "prediction": self.prediction,
            "result": self.result.to_dict() if self.result is not None else None,
            "error": (
                {
                    "stage": self.error.stage,
                    "type": self.error.type,
                    "message": self.error.message,
                    "attempts": self.error.attempts,
                }
                if self.error is not None
                else None
            ),
            "cached": self.cached,
            "usage": [self.usage.prompt_tokens, self.usage.completion_tokens],
            "truncated": self.truncated,
        }


_SUMMARY_FIELDS = (
    "prompt_hash",
    "score",
    "conservative_score",
    "total",
    "completed",
    "scored",
    "errors",
    "calls",
    "cache_hits",
    "retries",
    "timeouts",
    "truncated",
    "wall_time",
    "stopped_early",
    "upper_bound",
    "must_beat",
)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The result of `evaluate`.

    Two scores, because errors are neither right nor wrong:

    - ``score``: the global metric over the *scored* examples (the mean by default),
      errored examples left out and counted in ``errors``; ``NaN`` when nothing scored.
    - ``conservative_score``: the global metric with every errored example counted as a
      failure.  Decisions (the trainer's acceptance, racing's bound) use this one, so a
      candidate can never win by erroring on the examples it would get wrong.

    When racing cut the evaluation (``stopped_early``), both cover what completed and
    ``upper_bound`` is the best conservative score the full evaluation could have
    reached (``<= must_beat``).

    ``timeouts`` counts attempts that timed out (each is also in ``retries`` when it was
    retried); ``truncated`` counts answers cut at the length cap (finish reason
    ``length``): a prompt that rambles, or a ``max_tokens`` too small for the answer.
    """

    prompt_hash: str
    score: float
    total: int
    completed: int
    scored: int
    errors: int
    calls: int
    cache_hits: int
    retries: int
    usage: Usage
    wall_time: float
    stopped_early: bool = False
    upper_bound: float | None = None
    must_beat: float | None = None
    outcomes: tuple[Outcome, ...] = field(default=(), repr=False)
    conservative_score: float = float("nan")
    timeouts: int = 0
    truncated: int = 0
    hedges: int = 0  # duplicate requests sent by hedging (counted in ``calls``)

    @property
    def lost(self) -> int:
        """Examples with no outcome at all; always 0 unless racing cut the run."""
        return self.total - self.completed

    @property
    def error_rate(self) -> float:
        """Errored examples over completed ones (0 when nothing completed)."""
        return self.errors / self.completed if self.completed else 0.0

    def to_dict(self, *, outcomes: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(self, name) for name in _SUMMARY_FIELDS}
        data["usage"] = [self.usage.prompt_tokens, self.usage.completion_tokens]
        if self.hedges:  # only where hedging was on: the rows of everyone else unchanged
            data["hedges"] = self.hedges
        if outcomes:
            data["outcomes"] = [o.to_dict() for o in self.outcomes]
        return data
