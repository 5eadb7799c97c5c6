"""`AdaptiveConcurrency`: find how many calls a server really serves at a time.

``Limits.concurrency`` is a ceiling.  Below it the level follows what the answers say,
the way a delay-based limiter does (TCP Vegas, Netflix's concurrency-limits):

- Every answer is a sample ``(n, rtt)``: the calls in flight when it was sent (itself
  included) and how long it took.  A server that queues answers a call sent behind
  ``n - 1`` others after about ``n / c`` service times (``c`` requests served at a
  time): the round trip grows in step with ``n`` while throughput stays flat.  A wide
  server's round trip does not depend on ``n`` at all, however noisy it is.
- So, every few answers, the recent samples are tested for that shape: a strong rank
  correlation between ``n`` and ``rtt`` (Spearman, robust to a heavy latency tail)
  and a rise that matters (the fitted ``rtt`` at the largest ``n`` at least 1.4 times
  the one at the smallest).  When it holds, the server serves about
  ``c = base / slope`` calls at a time (``base``: the shortest round trip seen, one
  service time with nothing ahead) and the level drops toward ``c`` plus a quarter (at
  least one), at most by half per decision so one unlucky sample cannot sink it: the
  server always has the next call waiting, and no call waits out its timeout in the
  server's queue.
- Otherwise the level rises by a quarter (at least one) toward the ceiling: with no
  queueing shape in the samples, more calls at once means more throughput.  Except
  right after a queue was seen: at a steady level ``n`` hardly varies, so the shape
  cannot show, but round trips well above one service time still say the server
  queues.  The level then holds, for a while (`_HOLD` decisions), then probes up again
  (a server may have been given more slots meanwhile).

A level at the ceiling stays there against a server that does not queue: an instant
or wide server keeps its level, noise and all (n barely varies at a steady level, so
there is no correlation to find).  A call timed out is a sign of a queue too: the
level drops by a quarter.  While the server is known to queue, `expected_rtt` says
how long a call sent at ``n`` should take, and the endpoint lets an attempt wait that
long on top of its timeout: the timeout is for a server that hangs, not for one
that is working through a queue.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio

__all__ = ["AdaptiveConcurrency", "LevelChange", "LiveAttempts"]

# Samples tested for the queueing shape (the most recent ones).
_WINDOW = 32
# Answers between two decisions, and the samples a first decision needs.
_DECIDE_EVERY = 4
_MIN_SAMPLES = 8
# The shape of a queue: rank correlation of n and rtt, and the rise over the n seen.
_MIN_CORRELATION = 0.85
_MIN_RISE = 1.4
# Decisions a level found by a queue holds (while round trips stay long) before probing.
_HOLD = 16


@dataclass(frozen=True, slots=True)
class LevelChange:
    """A new concurrency level, the one before it, and why."""

    level: int
    previous: int
    reason: str
    serves: float | None = None  # the server's estimated requests at a time, if queueing


class AdaptiveConcurrency:
    """The adaptive level of one endpoint, between 1 and ``ceiling``.

    Usage (the endpoint does this)::

        adaptive = AdaptiveConcurrency(32)
        change = adaptive.on_answer(n=in_flight_at_send, rtt=seconds)
        if change is not None:
            limiter.set_level(change.level)
    """

    __slots__ = (
        "_base",
        "_capacity",
        "_held",
        "_samples",
        "_since",
        "_slope",
        "ceiling",
        "level",
    )

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.level = ceiling  # calls allowed in flight now
        self._samples: deque[tuple[int, float]] = deque(maxlen=_WINDOW)  # (n at send, rtt)
        # The shortest round trip ever seen: one service time with nothing ahead.  Not
        # a recent minimum: at a steady level every call waits behind others, and a
        # recent minimum would creep up and the level with it.
        self._base = math.inf
        self._since = 0  # answers since the last decision
        self._capacity: float | None = None  # requests served at a time, when queueing
        self._slope = 0.0  # seconds of round trip per call ahead, when queueing
        self._held = 0  # decisions held since the queue was last seen

    @property
    def serves(self) -> float | None:
        """The server's estimated requests served at a time, once it was seen queueing."""
        return self._capacity

    def expected_rtt(self, n: int) -> float:
        """How long a call sent with ``n`` in flight should take (0 if not queueing)."""
        if self._capacity is None:
            return 0.0
        return max(self._base, self._slope * n)

    def on_answer(self, n: int, rtt: float) -> LevelChange | None:
        """Record an answer; return the level change it leads to, if any."""
        self._samples.append((n, rtt))
        self._base = min(self._base, rtt)
        self._since += 1
        if self._since < _DECIDE_EVERY or len(self._samples) < _MIN_SAMPLES:
            return None
        self._since = 0
        return self._decide()

    def on_timeout(self) -> LevelChange | None:
        """A call timed out: a queue longer than the timeout, or a hung call."""
        return self._move(max(1, self.level * 3 // 4), "a call timed out")

    def _decide(self) -> LevelChange | None:
        fit = _queue_fit(self._samples)
        if fit is None:
            if self._still_queueing():
                self._held += 1
                return None
            grown = self.level + max(1, self.level // 4)
            return self._move(min(self.ceiling, grown), "no queueing: throughput may grow")
        self._held = 0
        capacity = min(float(self.ceiling), max(1.0, self._base / fit))
        self._capacity, self._slope = capacity, fit
        target = min(self.ceiling, math.ceil(capacity + max(1.0, capacity / 4)))
        return self._move(
            max(target, self.level // 2),
            f"the server queues: it serves about {capacity:.0f} request(s) at a time",
            capacity,
        )

    def _still_queueing(self) -> bool:
        """Whether a level found by a queue should hold: the queue was seen not long
        ago and the recent round trips are still well above one service time."""
        if self._capacity is None or self._held >= _HOLD:
            return False
        recent = sorted(r for _, r in list(self._samples)[-_MIN_SAMPLES:])
        return recent[len(recent) // 2] >= 1.5 * self._base

    def _move(self, level: int, reason: str, serves: float | None = None) -> LevelChange | None:
        if level == self.level:
            return None
        previous, self.level = self.level, level
        return LevelChange(level, previous, reason, serves)

    def __repr__(self) -> str:
        return f"<AdaptiveConcurrency level={self.level}/{self.ceiling} serves={self._capacity}>"


class LiveAttempts:
    """The attempts of one endpoint in flight, so their deadlines can move later once
    the server is seen queueing: each may wait its place in the queue on top of its
    timeout, never past its call's deadline."""

    __slots__ = ("_live",)

    def __init__(self) -> None:
        # scope -> (n at send, the deadline its timeout gave it, the call's deadline)
        self._live: dict[anyio.CancelScope, tuple[int, float, float]] = {}

    @contextmanager
    def track(
        self,
        scope: anyio.CancelScope,
        n: int,
        adaptive: AdaptiveConcurrency,
        give_up_at: float | None,
    ) -> Iterator[None]:
        entry = (n, scope.deadline, give_up_at if give_up_at is not None else math.inf)
        self._live[scope] = entry
        _move_deadline(scope, entry, adaptive)
        try:
            yield
        finally:
            del self._live[scope]

    def extend(self, adaptive: AdaptiveConcurrency) -> None:
        """Give every attempt in flight the wait its place in the queue needs."""
        for scope, entry in self._live.items():
            _move_deadline(scope, entry, adaptive)


def _move_deadline(
    scope: anyio.CancelScope, entry: tuple[int, float, float], adaptive: AdaptiveConcurrency
) -> None:
    n, timed, hard = entry
    wait = adaptive.expected_rtt(n)
    if wait > 0 and timed != math.inf:
        scope.deadline = max(scope.deadline, min(hard, timed + wait))


def _queue_fit(samples: deque[tuple[int, float]]) -> float | None:
    """The slope (seconds per call in flight) of round trip over ``n`` when the samples
    have a queue's shape, else ``None``."""
    ns = [n for n, _ in samples]
    if min(ns) == max(ns):
        return None  # one n only: nothing to compare
    rtts = [r for _, r in samples]
    if _spearman(ns, rtts) < _MIN_CORRELATION:
        return None
    count = len(ns)
    mean_n, mean_r = sum(ns) / count, sum(rtts) / count
    var_n = sum((n - mean_n) ** 2 for n in ns)
    slope = sum((n - mean_n) * (r - mean_r) for n, r in zip(ns, rtts, strict=True)) / var_n
    if slope <= 0:
        return None
    low = mean_r + slope * (min(ns) - mean_n)
    high = mean_r + slope * (max(ns) - mean_n)
    if low > 0 and high / low < _MIN_RISE:
        return None
    return slope


def _ranks(values: list[float] | list[int]) -> list[float]:
    """Ranks from 1, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(xs: list[int], ys: list[float]) -> float:
    """Spearman's rank correlation (0 when either side is constant)."""
    rx, ry = _ranks(xs), _ranks(ys)
    mean = (len(xs) + 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mean) ** 2 for a in rx)
    vy = sum((b - mean) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else 0.0
