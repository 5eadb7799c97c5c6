"""The run report's records: what a run did, as plain data every renderer reads.

The renderers (`_render`, `_plot`) take `RunRecord`; `RunReport` (in `_report`) is the
same record with its rendering methods, so no renderer imports the report back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PoolRecord",
    "ProposalRecord",
    "RunRecord",
    "StepRecord",
    "fmt_score",
    "score_series",
    "step_outcome",
]


@dataclass
class ProposalRecord:
    """One proposed prompt and what became of it."""

    step: int
    attempt: int
    variant: int
    prompt: dict[str, Any] | None
    accepted: bool = False
    reason: str = ""
    batch_score: float | None = None  # conservative: errored examples count as failures
    full_score: float | None = None  # conservative, exact; None when racing cut it
    full_mean: float | None = None  # mean over scored examples, for the report
    batch_errors: int = 0
    full_errors: int = 0
    raced: dict[str, Any] | None = None  # {"completed", "total", "upper_bound"} when cut
    raw: str | None = None  # the stage's raw output, kept for invalid proposals
    cost: float | None = None  # measured per example (dollars with a price, else tokens)
    length: int | None = None  # the prompt's own tokens
    parents: list[int] | None = None  # pareto: the pool ids it was made from
    candidate: int | None = None  # pareto: its id in the pool, once scored on validation


@dataclass
class PoolRecord:
    """One candidate of a Pareto pool: where it came from and what it leads."""

    id: int
    step: int  # -1: the initial prompt
    parents: list[int]
    prompt: dict[str, Any]
    val_score: float  # conservative, on the whole validation set
    cost: float | None
    length: int | None
    on_front: bool
    leads: list[str]  # validation example ids it is the best on (front members only)


@dataclass
class StepRecord:
    """One batch of the trainer's loop."""

    step: int
    batch_ids: list[str]
    batch_score: float
    best_score: float
    val_score: float | None = None
    batch_errors: int = 0
    perfect: bool = False
    proposals: list[ProposalRecord] = field(default_factory=list)
    gradients: list[str] = field(default_factory=list)  # accepted feedback, if any
    gradient_errors: list[str] = field(default_factory=list)
    stage: str | None = None  # a program: the name of the prompt this step updated


@dataclass
class RunRecord:
    """Everything a run did, as data (`RunReport` adds the renderings)."""

    initial_prompt: dict[str, Any]
    best_prompt: dict[str, Any]
    initial_score: float
    best_score: float
    initial_val_score: float | None = None
    val_score: float | None = None
    initial_mean: float | None = None  # the initial prompt's mean over scored examples
    initial_errors: int = 0
    errors: int = 0  # errored examples over every evaluation of the run
    answers: int = 0  # examples answered by the model (not from the cache) over the run
    truncated: int = 0  # ... of which cut at the length cap (finish_reason "length")
    timeouts: int = 0  # task-model attempts that timed out
    task_description: str = ""
    metric_description: str = ""
    generated_descriptions: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    cost: float | None = None
    # hedged requests, only when a model hedged ({} otherwise, left out of the JSON):
    # {"sent", "won", "tokens": {model: [prompt, completion]}, "cost"}; the tokens and
    # dollars are estimates (what the answer cost, per duplicate) and are in the above
    hedges: dict[str, Any] = field(default_factory=dict)
    cache_hits: int = 0
    stage_errors: dict[str, int] = field(default_factory=dict)  # failed stage calls, by stage
    examples_skipped_by_racing: int = 0
    full_evaluations: int = 0
    raced_evaluations: int = 0
    wall_time: float = 0.0
    stopped_reason: str = ""
    notes: list[str] = field(default_factory=list)
    judged_on: str = "train"  # the set best_score and every whole-set decision used
    pool: list[PoolRecord] = field(default_factory=list)  # pareto only
    tracking: dict[str, str] = field(default_factory=dict)  # {"mlflow_run_id": ...}
    # a program: {"prompts": {name: {"initial", "best", "changed_at"}}, "component",
    # "stages": {name: {"calls", "cache_hits"}}}; empty for one prompt
    program: dict[str, Any] = field(default_factory=dict)

    @property
    def proposals(self) -> list[ProposalRecord]:
        return [p for s in self.steps for p in s.proposals]

    def decisions(self) -> list[tuple[int, int, int, bool, str]]:
        """(step, attempt, variant, accepted, reason kind) per proposal, in order."""
        return [
            (p.step, p.attempt, p.variant, p.accepted, p.reason.split(":")[0])
            for p in self.proposals
        ]


def fmt_score(x: float | None) -> str:
    """A score as the reports show it: three decimals, ``-`` when there is none."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def score_series(report: RunRecord) -> list[tuple[str, list[float | None]]]:
    """What every chart of a run draws: the best train score after each step (step 0 is
    the initial prompt) and, with a validation set, the val score."""
    series: list[tuple[str, list[float | None]]] = [
        (
            f"{report.judged_on} (best)",
            [report.initial_score, *[s.best_score for s in report.steps]],
        )
    ]
    if report.initial_val_score is not None and report.judged_on != "val":
        series.append(("val", [report.initial_val_score, *[s.val_score for s in report.steps]]))
    return series


def step_outcome(step: StepRecord) -> str:
    if step.perfect:
        return "perfect batch"
    return "accepted" if any(p.accepted for p in step.proposals) else "no improvement"
