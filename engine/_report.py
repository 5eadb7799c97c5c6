"""The run report of `optimize`: JSON, a Markdown summary, and a score-per-step plot."""

from __future__ import annotations

import difflib
import html
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ProposalRecord", "RunReport", "StepRecord", "render_html"]


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


@dataclass
class RunReport:
    """Everything a run did; ``to_json``, ``to_markdown`` and ``plot`` render it."""

    initial_prompt: dict[str, Any]
    best_prompt: dict[str, Any]
    initial_score: float
    best_score: float
    initial_val_score: float | None = None
    val_score: float | None = None
    initial_mean: float | None = None  # the initial prompt's mean over scored examples
    initial_errors: int = 0
    errors: int = 0  # errored examples over every evaluation of the run
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
    notes: list[str] = field(default_factory=list)

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

    def to_html(self) -> str:
        """A self-contained HTML page: scores per step (inline SVG), the prompt diff,
        the steps and every proposal with its outcome.  No scripts, no external files."""
        return render_html(self)

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


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _prompt_text(prompt: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for m in prompt.get("messages", []):
        lines.append(f"[{m['role']}]")
        lines.extend(str(m["content"]).splitlines() or [""])
    return lines


def _svg_chart(report: RunReport, width: int = 640, height: int = 260) -> str:
    pad = 40
    train: list[float | None] = [report.initial_score, *[s.best_score for s in report.steps]]
    series = [("train (best)", "#1f6feb", train)]
    if report.val_score is not None:
        val = [report.initial_val_score, *[s.val_score for s in report.steps]]
        series.append(("val", "#d97706", val))
    n = max(len(train) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pad + i * (width - 2 * pad) / n, height - pad - v * (height - 2 * pad)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'role="img" aria-label="score per step">',
        f'<rect width="{width}" height="{height}" fill="#fff"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(0, tick)
        parts.append(
            f'<line x1="{pad}" x2="{width - pad}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
        )
        parts.append(
            f'<text x="{pad - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
            f"{tick:.2f}</text>"
        )
    for i in range(len(train)):
        x, _ = xy(i, 0)
        parts.append(
            f'<text x="{x:.1f}" y="{height - pad + 16}" font-size="11" '
            f'text-anchor="middle">{i}</text>'
        )
    for k, (label, color, values) in enumerate(series):
        points = [xy(i, v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]
        if points:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
            parts += [
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in points
            ]
        parts.append(
            f'<text x="{width - pad}" y="{pad - 18 + 14 * k}" font-size="12" '
            f'text-anchor="end" fill="{color}">{html.escape(label)}</text>'
        )
    parts.append(
        f'<text x="{width / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
        "step (batch)</text></svg>"
    )
    return "".join(parts)


def render_html(report: RunReport) -> str:
    """The report as one self-contained HTML page."""
    esc = html.escape
    diff = difflib.HtmlDiff(wrapcolumn=70).make_table(
        _prompt_text(report.initial_prompt),
        _prompt_text(report.best_prompt),
        "initial prompt",
        "best prompt",
        context=False,
    )
    steps = "".join(
        f"<tr><td>{s.step}</td><td>{_fmt(s.batch_score)}</td><td>{_fmt(s.best_score)}</td>"
        f"<td>{_fmt(s.val_score)}</td><td>{len(s.proposals)}</td><td>"
        + (
            "perfect batch"
            if s.perfect
            else "accepted"
            if any(p.accepted for p in s.proposals)
            else "no improvement"
        )
        + "</td></tr>"
        for s in report.steps
    )
    proposals = "".join(
        f'<tr class="{"ok" if p.accepted else "no"}"><td>{p.step}.{p.attempt}.{p.variant}</td>'
        f"<td>{_fmt(p.batch_score)}</td><td>{_fmt(p.full_score)}</td><td>{esc(p.reason)}</td></tr>"
        for p in report.proposals
    )
    cost = f"${report.cost:.4f}" if report.cost is not None else "unknown"
    calls = ", ".join(f"{esc(m)}: {n}" for m, n in sorted(report.calls.items()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Optimization report</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #111; }}
h1 {{ font-size: 1.5rem; }} h2 {{ font-size: 1.15rem; margin-top: 2rem; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 3px 8px; border-bottom: 1px solid #eee; }}
th {{ text-align: left; background: #f6f8fa; }}
.kpi {{ display: flex; gap: 2rem; }} .kpi div {{ background: #f6f8fa; padding: .6rem 1rem; }}
.kpi b {{ font-size: 1.3rem; display: block; }}
tr.ok td {{ background: #e6ffec; }}
table.diff {{ font: 12px monospace; }}
td.diff_next {{ display: none; }} .diff_add {{ background: #e6ffec; }}
.diff_chg {{ background: #fff5b1; }} .diff_sub {{ background: #ffebe9; }}
</style></head><body>
<h1>Optimization report</h1>
<div class="kpi">
<div>train<b>{_fmt(report.initial_score)} &rarr; {_fmt(report.best_score)}</b></div>
<div>val<b>{_fmt(report.initial_val_score)} &rarr; {_fmt(report.val_score)}</b></div>
<div>steps<b>{len(report.steps)}</b></div>
<div>proposals<b>{len(report.proposals)}</b></div>
<div>est. cost<b>{esc(cost)}</b></div>
</div>
<p>Stopped: {esc(report.stopped_reason)}. Calls: {calls}; cache hits {report.cache_hits};
full-set validations {report.full_evaluations}, cut by racing {report.raced_evaluations}
({report.examples_skipped_by_racing} examples skipped); wall time {report.wall_time:.1f}s.</p>
<h2>Score per step</h2>
{_svg_chart(report)}
<h2>Prompt: initial vs best</h2>
{diff}
<h2>Steps</h2>
<table><tr><th>step</th><th>batch</th><th>best train</th><th>val</th><th>proposals</th>
<th>outcome</th></tr>
{steps}</table>
<h2>Proposals</h2>
<table><tr><th>step.attempt.variant</th><th>batch</th><th>full</th><th>outcome</th></tr>
{proposals}</table>
</body></html>
"""
