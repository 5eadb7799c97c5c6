"""Selection policies beside the seed's greedy rule: second objectives and a Pareto pool.

Everything here is pure bookkeeping (no calls); `engine.training._trainer` and
`engine.training._proposals` decide *when* to measure and ask it *what wins*.

- **Tie-break** (``tie_break=("cost", "length")``): two prompts with the same score are
  ordered by measured cost per example, then by prompt tokens; the lower wins.  With
  no tie-break every key is ``()`` and "wins" is the seed's strict ``>``, so the older
  prompt keeps a tie.
- **Pareto pool** (``selection="pareto"``, after GEPA): every candidate that passed the
  batch step has its per-example conservative scores on the validation set.  A
  candidate is on the front when it is the best on at least one validation example
  (examples nobody solves lead nothing) and no other candidate dominates it (at least
  as good everywhere and better somewhere; equal vectors keep the preferred one: the
  lower tie-break key, then the older).  The next parent is drawn from the front with
  weights equal to the number of examples each leads, by the run's own seeded RNG.
  The returned prompt is the best mean on the validation set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._budget import Price
from .._outcome import Outcome
from .._prompt import Prompt
from ..endpoint import estimate_text_tokens
from ..report import PoolRecord, ProposalRecord

__all__ = [
    "Candidate",
    "ParetoPool",
    "TieKey",
    "cost_per_example",
    "merge_feedback",
    "prompt_length",
    "racing_bar",
    "record_key",
    "tie_key",
    "wins",
]

TieKey = tuple[float, ...]


def prompt_length(prompt: Prompt) -> int:
    """The prompt's own tokens (4-characters rule), placeholders unfilled."""
    return sum(estimate_text_tokens(str(m.get("content", ""))) for m in prompt.messages)


def cost_per_example(outcomes: Sequence[Outcome], price: Price | None) -> float | None:
    """Measured cost per scored example: dollars with a price, else tokens.

    Cached outcomes carry the usage of the call that produced them, so a prompt's cost
    is the same measured from the cache or paid.  ``None`` when nothing was scored.
    """
    scored = [o for o in outcomes if o.result is not None]
    if not scored:
        return None
    if price is not None:
        return sum(price.cost(o.usage) for o in scored) / len(scored)
    return sum(o.usage.total_tokens for o in scored) / len(scored)


def tie_key(tie_break: Sequence[str], cost: float | None, length: int | None) -> TieKey:
    """The order of equal scores: lower wins; an unknown measure loses to a known one."""
    values = {"cost": cost, "length": length}
    return tuple(math.inf if values[k] is None else float(values[k] or 0) for k in tie_break)


def record_key(record: ProposalRecord, tie_break: Sequence[str]) -> TieKey:
    return tie_key(tie_break, record.cost, record.length)


def wins(score: float, key: TieKey, bar: float, bar_key: TieKey) -> bool:
    """A strictly higher score wins; an equal one wins only on a lower tie-break key
    (always ``()`` without a tie-break: the seed's strict ``>``)."""
    return score > bar or (score == bar and key < bar_key)


def racing_bar(bar: float, tie_break: Sequence[str]) -> float:
    """The ``must_beat`` for racing: with a tie-break, a candidate that can still *tie*
    the best may win the tie, so only one that cannot reach the bar is cut."""
    return math.nextafter(bar, -math.inf) if tie_break else bar


@dataclass(frozen=True, slots=True)
class Candidate:
    """A prompt in the pool and its per-example conservative scores on validation."""

    id: int
    prompt: Prompt
    parents: tuple[int, ...]
    scores: tuple[float, ...]
    mean: float  # the conservative global metric on the validation set
    key: TieKey
    step: int  # -1: the initial prompt
    cost: float | None = None
    length: int | None = None


@dataclass
class ParetoPool:
    """The candidates, their front, and the parent draw."""

    example_ids: list[str]
    rng: random.Random  # owned by the run, seeded apart from the shuffle
    candidates: list[Candidate] = field(default_factory=list)
    leads: dict[int, list[int]] = field(default_factory=dict)  # front id -> example indices
    merged: set[tuple[int, int]] = field(default_factory=set)  # pairs already proposed

    def add(self, candidate: Candidate) -> bool:
        """Add a candidate and recompute the front; True when it is on it."""
        self.candidates.append(candidate)
        self.leads = self._front()
        return candidate.id in self.leads

    def next_id(self) -> int:
        return len(self.candidates)

    def best(self) -> Candidate:
        """The best mean on validation; ties by the tie-break key, then the older."""
        return min(self.candidates, key=lambda c: (-c.mean, c.key, c.id))

    def sample_parent(self) -> Candidate:
        """A front member, drawn with weight = the number of examples it leads."""
        ids = sorted(self.leads)
        weights = [max(len(self.leads[i]), 1) for i in ids]
        return self.candidates[self.rng.choices(ids, weights)[0]]

    def ancestors(self, cid: int) -> set[int]:
        seen: set[int] = set()
        todo = list(self.candidates[cid].parents)
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo.extend(self.candidates[pid].parents)
        return seen

    def merge_pair(self) -> tuple[Candidate, Candidate] | None:
        """Two front members that share an ancestor and neither descends from the other
        (each learned something the other has not), not proposed before; drawn by the
        run's RNG and marked as proposed."""
        ids = sorted(self.leads)
        pairs = []
        for n, a in enumerate(ids):
            for b in ids[n + 1 :]:
                up_a, up_b = self.ancestors(a), self.ancestors(b)
                if (a, b) not in self.merged and a not in up_b and b not in up_a and up_a & up_b:
                    pairs.append((a, b))
        if not pairs:
            return None
        a, b = self.rng.choice(pairs)
        self.merged.add((a, b))
        return self.candidates[a], self.candidates[b]

    def common_ancestor(self, a: int, b: int) -> Candidate:
        """The youngest ancestor ``a`` and ``b`` share (they must share one)."""
        return self.candidates[max(self.ancestors(a) & self.ancestors(b))]

    def _front(self) -> dict[int, list[int]]:
        pool = self.candidates
        n = len(self.example_ids)
        top = [max(c.scores[i] for c in pool) for i in range(n)]
        leaders = {c.id for c in pool for i in range(n) if top[i] > 0 and c.scores[i] == top[i]}
        kept = [
            c
            for c in pool
            if c.id in leaders
            and not any(_dominates(d, c) for d in pool if d.id in leaders and d is not c)
        ]
        if not kept:  # nobody solves anything yet: the best mean carries on alone
            return {self.best().id: []}
        return {c.id: [i for i in range(n) if top[i] > 0 and c.scores[i] == top[i]] for c in kept}

    def records(self) -> list[PoolRecord]:
        """The pool as the report shows it: parents, scores, what each front member leads."""
        return [
            PoolRecord(
                id=c.id,
                step=c.step,
                parents=list(c.parents),
                prompt=c.prompt.to_dict(),
                val_score=c.mean,
                cost=c.cost,
                length=c.length,
                on_front=c.id in self.leads,
                leads=[self.example_ids[i] for i in self.leads.get(c.id, [])],
            )
            for c in self.candidates
        ]


def merge_feedback(other: Prompt, ancestor: Prompt) -> str:
    """The feedback of a merge proposal: the apply stage, shown one front member as the
    current prompt, is asked to fold in what the other learned since their ancestor."""

    def text(prompt: Prompt) -> str:
        return "\n".join(f"[{m['role']}] {m['content']}" for m in prompt.messages)

    return (
        "MERGE: combine the current prompt with another prompt that does better on "
        "other examples. Both grew from the same ancestor; keep what each added to it.\n"
        f"## Other prompt\n{text(other)}\n## Common ancestor\n{text(ancestor)}"
    )


def _dominates(d: Candidate, c: Candidate) -> bool:
    """``d`` is at least as good as ``c`` on every example and better on one; an equal
    vector dominates when it is preferred (lower tie-break key, then older)."""
    if any(x < y for x, y in zip(d.scores, c.scores, strict=True)):
        return False
    if any(x > y for x, y in zip(d.scores, c.scores, strict=True)):
        return True
    return (d.key, d.id) < (c.key, c.id)
