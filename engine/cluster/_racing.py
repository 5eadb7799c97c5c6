"""Exact racing across shards: one tally for every worker of an evaluation.

A local evaluation stops as soon as ``(s + N - k) / N <= must_beat`` (``k`` outcomes
with score sum ``s``, errors counting 0).  On a cluster the outcomes are spread over
workers, so one `RacingTally` actor holds the sums: workers report their outcomes in
small batches (`RaceReporter`) and learn from each answer whether to stop.  The bound
only falls as outcomes arrive, so whatever subset proves "cannot win" proves it for the
whole run: the decision is the local one.  An outcome is counted once per (batch,
position); when a batch is run again after its worker died, what the dead run reported
is forgotten first (`RacingTally.forget`): the tally counts the run the driver delivers.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import anyio

from .._outcome import Outcome

__all__ = ["RaceReporter", "RacingTally"]

REPORT_INTERVAL = 0.05  # seconds between a worker's reports (and stop checks)


class _Race:
    """The running sums of one raced evaluation."""

    __slots__ = ("completed", "must_beat", "score_sum", "seen", "total", "upper_bound")

    def __init__(self, total: int, must_beat: float) -> None:
        self.total = total
        self.must_beat = Fraction(must_beat)
        self.score_sum = Fraction(0)
        self.completed = 0
        # batch sequence number -> position -> the score counted (None: an error)
        self.seen: dict[int, dict[int, Fraction | None]] = {}
        self.upper_bound: Fraction | None = None  # set when the bound says stop

    def check(self) -> None:
        """Set (or clear) the bound that stops the race.  Not when every outcome is in:
        a full run is not cut, whatever its score (as a local run reports it)."""
        bound = (self.score_sum + (self.total - self.completed)) / self.total
        cut = self.completed < self.total and bound <= self.must_beat
        self.upper_bound = bound if cut else None


class RacingTally:
    """The sums of every raced evaluation of a cluster (the body of one Ray actor,
    made once: an actor per evaluation would cost a process start each)."""

    def __init__(self) -> None:
        self.races: dict[str, _Race] = {}

    def start(self, job: str, total: int, must_beat: float) -> None:
        """Before the first outcome of ``job``: its size and the score to beat."""
        self.races[job] = _Race(total, must_beat)

    def add(self, job: str, seq: int, items: list[tuple[int, float | None]]) -> bool:
        """Count ``(position, score or None)`` outcomes of batch ``seq``; True: stop."""
        race = self.races.get(job)
        if race is None:
            return True  # the evaluation is over: nothing more is wanted
        seen = race.seen.setdefault(seq, {})
        for position, score in items:
            if position in seen:
                continue
            exact = Fraction(score) if score is not None else None
            seen[position] = exact
            race.completed += 1
            if exact is not None:
                race.score_sum += exact
        if race.upper_bound is None:
            race.check()
        return race.upper_bound is not None

    def forget(self, job: str, seq: int) -> None:
        """Batch ``seq`` runs again (its worker died): drop what its dead run reported,
        so the tally holds the scores the driver will deliver, not the dead run's."""
        race = self.races.get(job)
        if race is None:
            return
        for score in race.seen.pop(seq, {}).values():
            race.completed -= 1
            if score is not None:
                race.score_sum -= score
        race.check()

    def stopped(self, job: str) -> bool:
        race = self.races.get(job)
        return race is None or race.upper_bound is not None

    def finish(self, job: str) -> float | None:
        """Forget ``job``; the bound that stopped it, or None if it ran to the end."""
        race = self.races.pop(job, None)
        if race is None or race.upper_bound is None:
            return None
        return float(race.upper_bound)


class RaceReporter:
    """A worker's side of racing for one batch: buffer outcomes, report, stop."""

    def __init__(self, tally: Any, job: str, seq: int) -> None:
        self.tally = tally  # the RacingTally actor's handle
        self.job = job
        self.seq = seq
        self.buffer: list[tuple[int, float | None]] = []
        self.stop = False

    def add(self, outcome: Outcome) -> None:
        self.buffer.append((outcome.index, outcome.score))

    async def flush(self) -> bool:
        """Report what is buffered (or just ask); True when the run must stop."""
        items, self.buffer = self.buffer, []
        if items:
            self.stop = bool(await self.tally.add.remote(self.job, self.seq, items))
        else:
            self.stop = bool(await self.tally.stopped.remote(self.job))
        return self.stop

    async def watch(self, scope: anyio.CancelScope) -> None:
        """Report every `REPORT_INTERVAL`; cancel ``scope`` (the batch's calls in
        flight included) once the tally says the candidate cannot win."""
        while True:
            await anyio.sleep(REPORT_INTERVAL)
            if await self.flush():
                scope.cancel()
                return
