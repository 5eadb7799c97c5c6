"""The run report of `optimize`: JSON, a Markdown summary, and a score-per-step plot."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ProposalRecord", "RunReport", "StepRecord"]


@dataclass
class ProposalRecord:
    """One proposed prompt and what became of it."""

    step: int
    attempt: int
    variant: int
    prompt: dict[str, Any] | None
    accepted: bool = False
    reason: str = ""
    batch_score: float | None = None
    full_score: float | None = None
    raced: dict[str, Any] | None = None  # {"completed", "total", "upper_bound"} when cut
    raw: str | None = None  # the stage's raw output, kept for invalid proposals


@dataclass
class StepRecord:
    """One batch of the trainer's loop."""

    step: int
    batch_ids: list[str]
    batch_score: float
    best_score: float
    val_score: float | None = None
    perfect: bool = False
    proposals: list[ProposalRecord] = field(default_factory=list)
    gradients: list[str] = field(default_factory=list)  # accepted feedback, if any
    gradient_errors: list[str] = field(default_factory=list)


@dataclass
class RunReport:
    """Everything a run did; ``to_json``, ``to_markdown`` and ``plot`` render it."""

    initial_prompt: dict[str, Any]
    best_prompt: dict[str, Any]
    initial_score: float
    best_score: float
    initial_val_score: float | None = None
    val_score: float | None = None
    task_description: str = ""
    metric_description: str = ""
    generated_descriptions: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    steps: list[StepRecord] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    cost: float | None = None
    cache_hits: int = 0
    examples_skipped_by_racing: int = 0
    full_evaluations: int = 0
    raced_evaluations: int = 0
    wall_time: float = 0.0
    stopped_reason: str = ""

    @property
    def proposals(self) -> list[ProposalRecord]:
        return [p for s in self.steps for p in s.proposals]

    def decisions(self) -> list[tuple[int, int, int, bool, str]]:
        """(step, attempt, variant, accepted, reason kind) per proposal, in order."""
        return [
            (p.step, p.attempt, p.variant, p.accepted, p.reason.split(":")[0])
            for p in self.proposals
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2, **kwargs)

    def to_markdown(self) -> str:
        def fmt(x: float | None) -> str:
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"

        lines = [
            "# Optimization report",
            "",
            f"- train score: {fmt(self.initial_score)} -> **{fmt(self.best_score)}**",
        ]
        if self.val_score is not None:
            lines.append(f"- val score: {fmt(self.initial_val_score)} -> **{fmt(self.val_score)}**")
        cost = f"${self.cost:.4f}" if self.cost is not None else "unknown (no price)"
        lines += [
            f"- stopped: {self.stopped_reason}",
            f"- steps: {len(self.steps)}, proposals: {len(self.proposals)}, "
            f"accepted: {sum(p.accepted for p in self.proposals)}",
            f"- calls: {sum(self.calls.values())} "
            f"({', '.join(f'{m}: {n}' for m, n in sorted(self.calls.items()))}), "
            f"cache hits: {self.cache_hits}, estimated cost: {cost}",
            f"- full-set validations: {self.full_evaluations}, cut by racing: "
            f"{self.raced_evaluations} ({self.examples_skipped_by_racing} examples skipped)",
            f"- wall time: {self.wall_time:.1f}s",
            "",
            "## Steps",
            "",
            "| step | batch | best train | val | proposals | outcome |",
            "|---:|---:|---:|---:|---:|---|",
        ]
        for s in self.steps:
            outcome = (
                "perfect batch"
                if s.perfect
                else "accepted"
                if any(p.accepted for p in s.proposals)
                else "no improvement"
            )
            lines.append(
                f"| {s.step} | {fmt(s.batch_score)} | {fmt(s.best_score)} | {fmt(s.val_score)} "
                f"| {len(s.proposals)} | {outcome} |"
            )
        lines += ["", "## Proposals", ""]
        for p in self.proposals:
            scores = f"batch {fmt(p.batch_score)}, full {fmt(p.full_score)}"
            lines.append(f"- step {p.step}.{p.attempt}.{p.variant}: {p.reason} ({scores})")
        lines += ["", "## Best prompt", ""]
        for m in self.best_prompt.get("messages", []):
            lines += [f"**{m['role']}**", "", "```", m["content"], "```", ""]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of best train score (and val score) per step; needs matplotlib."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 3.5), dpi=120)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        steps = [0, *[s.step + 1 for s in self.steps]]
        ax.plot(
            steps,
            [self.initial_score, *[s.best_score for s in self.steps]],
            marker="o",
            label="train (best)",
        )
        if self.val_score is not None:
            vals = [self.initial_val_score, *[s.val_score for s in self.steps]]
            ax.plot(steps, [math.nan if v is None else v for v in vals], marker="s", label="val")
        ax.set_xlabel("step (batch)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        ax.set_title("TextGradientTrainer: score per step")
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        return out
