"""Exact racing across shards: one tally for every worker of an evaluation.

A local evaluation stops as soon as ``(s + N - k) / N <= must_beat`` (``k`` outcomes
with score sum ``s``, errors counting 0).  On a cluster the outcomes are spread over
workers, so one `RacingTally` actor holds the sums: workers report their outcomes in
small batches (`RaceReporter`) and learn from each answer whether to stop.  The bound
only falls as outcomes arrive, so whatever subset proves "cannot win" proves it for the
whole run: the decision is the local one.  An outcome is counted once per (batch,
position), however many times a batch is run after a worker died.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import anyio

from .._outcome import Outcome

__all__ = ["RaceReporter", "RacingTally"]

REPORT_INTERVAL = 0.05  # seconds between a worker's reports (and stop checks)


class RacingTally:
    """Running sums of one raced evaluation (the body of a Ray actor).

    Made before the dataset's size is known (a file is counted by its check pass);
    `start` sets it and the score to beat before the first outcome.
    """

    def __init__(self) -> None:
        self.total = 0
        self.must_beat = Fraction(0)
        self.score_sum = Fraction(0)
        self.completed = 0
        self.seen: dict[int, set[int]] = {}  # batch sequence number -> positions counted
        self.upper_bound: Fraction | None = None  # set when the bound says stop

    def start(self, total: int, must_beat: float) -> None:
        self.total, self.must_beat = total, Fraction(must_beat)

    def add(self, seq: int, items: list[tuple[int, float | None]]) -> bool:
        """Count ``(position, score or None)`` outcomes of batch ``seq``; True: stop."""
        seen = self.seen.setdefault(seq, set())
        for position, score in items:
            if position in seen:
                continue
            seen.add(position)
            self.completed += 1
            if score is not None:
                self.score_sum += Fraction(score)
        if self.upper_bound is None:
            bound = (self.score_sum + (self.total - self.completed)) / self.total
            if bound <= self.must_beat:
                self.upper_bound = bound
        return self.upper_bound is not None

    def stopped(self) -> bool:
        return self.upper_bound is not None

    def state(self) -> tuple[int, float | None]:
        """(outcomes counted, the bound that stopped the run or None)."""
        bound = float(self.upper_bound) if self.upper_bound is not None else None
        return self.completed, bound


class RaceReporter:
    """A worker's side of racing for one batch: buffer outcomes, report, stop."""

    def __init__(self, tally: Any, seq: int) -> None:
        self.tally = tally  # the RacingTally actor's handle
        self.seq = seq
        self.buffer: list[tuple[int, float | None]] = []
        self.stop = False

    def add(self, outcome: Outcome) -> None:
        self.buffer.append((outcome.index, outcome.score))

    async def flush(self) -> bool:
        """Report what is buffered (or just ask); True when the run must stop."""
        items, self.buffer = self.buffer, []
        if items:
            self.stop = bool(await self.tally.add.remote(self.seq, items))
        else:
            self.stop = bool(await self.tally.stopped.remote())
        return self.stop

    async def watch(self, scope: anyio.CancelScope) -> None:
        """Report every `REPORT_INTERVAL`; cancel ``scope`` (the batch's calls in
        flight included) once the tally says the candidate cannot win."""
        while True:
            await anyio.sleep(REPORT_INTERVAL)
            if await self.flush():
                scope.cancel()
                return
