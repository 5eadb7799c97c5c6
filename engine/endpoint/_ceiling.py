"""The rule a 429 sets for a rate learned from headers: `RateCeiling`.

One rule for the in-process limiter (`RateLimiter`, requests per minute) and the
cluster's rate budget (`engine.cluster`, requests per second): a rate is given in the
caller's own unit, and so is the floor.

A provider's header can overstate its limit.  A 429 while the learned rate is far
above what got through (more than `PLAUSIBLE` times it) proves the header wrong: the
rate drops to `BACK_OFF` of what got through, and that *ceiling* holds whatever later
headers announce.  Each fresh 429 under a ceiling lowers it by `STEP_DOWN`; every
`PROBE_AFTER` seconds without a 429 raise it by `PROBE_STEP` (additive increase in
spirit: a ceiling set in a burst does not hold a run down forever), never under the
floor, and the rate it gives never past what the headers announce (a ceiling only ever
holds a rate down).  A 429 with the rate near what got through is a drained bucket, not a wrong
header: the rate stands and the pause gate answers it.
"""

from __future__ import annotations

import math

__all__ = [
    "BACK_OFF",
    "FLOOR_RPM",
    "PLAUSIBLE",
    "PROBE_AFTER",
    "PROBE_STEP",
    "STEP_DOWN",
    "RateCeiling",
]

PLAUSIBLE = 3.0
"""A learned rate within this factor of what got through is believed despite a 429."""
BACK_OFF = 0.7
"""The first ceiling: this share of what got through."""
STEP_DOWN = 0.85
"""A 429 under a ceiling lowers it by this factor."""
PROBE_AFTER = 5.0
"""Seconds without a 429 before a ceiling is raised ..."""
PROBE_STEP = 1.1
"""... by this factor."""
FLOOR_RPM = 6.0
"""The lowest rate (requests per minute) a 429 can push a ceiling to."""


class RateCeiling:
    """The ceiling a 429 set on a header-learned rate (see the module docstring).

    Parameters:
        floor: the lowest rate a 429 can push the ceiling to, in the caller's unit.
    """

    __slots__ = ("announced", "floor", "level", "since")

    def __init__(self, floor: float) -> None:
        self.floor = floor
        self.level: float | None = None  # the ceiling, None until a 429 proves a header wrong
        self.since = -math.inf  # clock time it last moved
        self.announced: float | None = None  # the rate the headers last announced

    def lower(self, rate: float, achieved: float, now: float) -> float | None:
        """A fresh 429 under ``rate`` while ``achieved`` got through (> 0): the rate to
        send at from now on, or ``None`` when the rate stands."""
        if self.level is not None:  # still too high: a gentler step than the first
            self.level = max(self.floor, rate * STEP_DOWN)
        elif rate > PLAUSIBLE * achieved:
            self.level = max(self.floor, achieved * BACK_OFF)
        else:
            return None
        self.since = now
        return self.level

    def probe(self, now: float) -> float | None:
        """After `PROBE_AFTER` seconds without a 429, the ceiling raised a step and the
        rate to send at (never past what the headers announce); else ``None``."""
        if self.level is None or now - self.since < PROBE_AFTER:
            return None
        self.level *= PROBE_STEP
        self.since = now
        return self.cap(self.announced) if self.announced is not None else self.level

    def cap(self, announced: float) -> float:
        """The rate to send at when the headers announce ``announced``: held under the
        ceiling (which a header never lifts)."""
        self.announced = announced
        return announced if self.level is None else min(announced, self.level)
