"""A run report as Markdown and as one self-contained HTML page.

Both say what a user who ships the winning prompt needs: the conservative score every
decision used, the mean over scored examples beside it with the error count, why the
run stopped, any note (racing off), and what became of every proposal.
"""

from __future__ import annotations

import difflib
import html
import math
from typing import Any

from .._svg import Series, chart
from ._report import ProposalRecord, RunReport, fmt_score, score_series, step_outcome

__all__ = ["render_html", "render_markdown"]

_COLORS = ("#1f6feb", "#d97706")


def _initial(report: RunReport) -> str:
    """The initial score with what it rests on: 'X (mean over scored Y, N errors)'."""
    text = fmt_score(report.initial_score)
    if report.initial_errors:
        text += (
            f" (errors counted as failures; mean over scored {fmt_score(report.initial_mean)}, "
            f"{report.initial_errors} errored)"
        )
    return text


def _truncation_note(truncated: int, answers: int | None) -> str:
    """What to say about answers cut at the length cap ('' when none was)."""
    if not truncated:
        return ""
    of = f" of {answers}" if answers else ""
    return (
        f"{truncated}{of} answers cut at the length limit: set max_tokens or tell the "
        "prompt to be brief"
    )


def _warnings(report: RunReport) -> list[str]:
    """Lines about what the model did that the scores alone do not show."""
    out = []
    if report.truncated:
        out.append(_truncation_note(report.truncated, report.answers))
    if report.timeouts:
        out.append(
            f"{report.timeouts} model calls timed out (counted apart from other retries); "
            "a local server that serves one request at a time needs a lower concurrency "
            "or a longer timeout"
        )
    return out


def _cost(report: RunReport) -> str:
    return f"${report.cost:.4f}" if report.cost is not None else "unknown (no price)"


def _calls(report: RunReport) -> str:
    per_model = ", ".join(f"{m}: {n}" for m, n in sorted(report.calls.items()))
    return f"{sum(report.calls.values())} ({per_model})"


def _proposal_scores(p: ProposalRecord) -> str:
    text = f"batch {fmt_score(p.batch_score)}, full {fmt_score(p.full_score)}"
    errors = p.batch_errors + p.full_errors
    text += f", {errors} errored" if errors else ""
    if p.cost is not None:
        text += f", cost/example {p.cost:.4g}"
    if p.length is not None:
        text += f", {p.length} prompt tokens"
    if p.parents is not None:
        text += f", from {'+'.join(f'#{i}' for i in p.parents)}"
    return text + (f", pool #{p.candidate}" if p.candidate is not None else "")


def _pool(report: RunReport) -> list[str]:
    """The Pareto pool: each candidate's parents, validation score, cost, length and
    the validation examples it leads (front members only)."""
    if not report.pool:
        return []
    lines = [
        "",
        "## Candidate pool (Pareto front on the validation set)",
        "",
        "| id | step | parents | val | cost/example | tokens | front | leads |",
        "|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for c in report.pool:
        cost = "-" if c.cost is None else f"{c.cost:.4g}"
        parents = ", ".join(f"#{i}" for i in c.parents) or "-"
        leads = ", ".join(c.leads) if c.on_front else "-"
        lines.append(
            f"| #{c.id} | {c.step} | {parents} | {fmt_score(c.val_score)} | {cost} | "
            f"{c.length if c.length is not None else '-'} | "
            f"{'yes' if c.on_front else 'no'} | {leads} |"
        )
    return lines


def _val_score(report: RunReport) -> str:
    """The best prompt's val score; with a validation set but none for the best prompt
    (the run stopped before its validation run), say so rather than show another's."""
    if report.val_score is None and report.initial_val_score is not None:
        return "not measured"
    return fmt_score(report.val_score)


def render_markdown(report: RunReport) -> str:
    judged = "train score" if report.judged_on == "train" else "score (judged on val)"
    lines = [
        "# Optimization report",
        "",
        f"- {judged}: {_initial(report)} -> **{fmt_score(report.best_score)}**",
    ]
    if report.initial_val_score is not None and report.judged_on == "train":
        lines.append(
            f"- val score: {fmt_score(report.initial_val_score)} -> **{_val_score(report)}**"
        )
    lines += [
        f"- stopped: {report.stopped_reason}",
        *(f"- note: {note}" for note in report.notes),
        *(f"- warning: {line}" for line in _warnings(report)),
        f"- steps: {len(report.steps)}, proposals: {len(report.proposals)}, "
        f"accepted: {sum(p.accepted for p in report.proposals)}",
        f"- calls: {_calls(report)}, cache hits: {report.cache_hits}, "
        f"errored examples: {report.errors}, estimated cost: {_cost(report)}",
        f"- full-set validations: {report.full_evaluations}, cut by racing: "
        f"{report.raced_evaluations} ({report.examples_skipped_by_racing} examples skipped)",
        f"- wall time: {report.wall_time:.1f}s",
        "- scores are conservative: an errored example counts as a failure",
        "",
        "## Steps",
        "",
        f"| step | batch | best {report.judged_on} | val | proposals | outcome |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {s.step} | {fmt_score(s.batch_score)} | {fmt_score(s.best_score)} | "
        f"{fmt_score(s.val_score)} | {len(s.proposals)} | {step_outcome(s)} |"
        for s in report.steps
    ]
    lines += ["", "## Proposals", ""]
    lines += [
        f"- step {p.step}.{p.attempt}.{p.variant}: {p.reason} ({_proposal_scores(p)})"
        for p in report.proposals
    ]
    lines += _pool(report)
    lines += ["", "## Best prompt", ""]
    for m in report.best_prompt.get("messages", []):
        lines += [f"**{m['role']}**", "", "```", m["content"], "```", ""]
    return "\n".join(lines)


def _prompt_text(prompt: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for m in prompt.get("messages", []):
        lines.append(f"[{m['role']}]")
        lines.extend(str(m["content"]).splitlines() or [""])
    return lines


def _points(values: list[float | None]) -> list[tuple[float, float]]:
    """(step, score) for every step that has a score (none, or NaN, is a gap)."""
    return [(float(i), v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]


def _score_chart(report: RunReport) -> str:
    series = [
        Series(label, color, _points(values))
        for (label, values), color in zip(score_series(report), _COLORS, strict=False)
    ]
    return chart(
        "score per step",
        series,
        x_label="step (batch); 0 is the initial prompt",
        width=640,
        height=260,
        y_max=1.0,
        integer_x=True,
    )


def _tables(report: RunReport) -> tuple[str, str]:
    esc = html.escape
    steps = "".join(
        f"<tr><td>{s.step}</td><td>{fmt_score(s.batch_score)}</td>"
        f"<td>{fmt_score(s.best_score)}</td><td>{fmt_score(s.val_score)}</td>"
        f"<td>{len(s.proposals)}</td><td>{step_outcome(s)}</td></tr>"
        for s in report.steps
    )
    proposals = "".join(
        f'<tr class="{"ok" if p.accepted else "no"}"><td>{p.step}.{p.attempt}.{p.variant}</td>'
        f"<td>{fmt_score(p.batch_score)}</td><td>{fmt_score(p.full_score)}</td>"
        f"<td>{p.batch_errors + p.full_errors}</td><td>{esc(p.reason)}</td></tr>"
        for p in report.proposals
    )
    return steps, proposals


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #111; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f8fa; }
.kpi { display: flex; gap: 2rem; } .kpi div { background: #f6f8fa; padding: .6rem 1rem; }
.kpi b { font-size: 1.3rem; display: block; }
tr.ok td { background: #e6ffec; }
table.diff { font: 12px monospace; }
td.diff_next { display: none; } .diff_add { background: #e6ffec; }
.diff_chg { background: #fff5b1; } .diff_sub { background: #ffebe9; }
"""


def _summary(report: RunReport) -> str:
    esc = html.escape
    notes = "".join(f"<p><b>Note:</b> {esc(note)}</p>" for note in report.notes)
    notes += "".join(f"<p><b>Warning:</b> {esc(line)}</p>" for line in _warnings(report))
    return (
        f'<div class="kpi">'
        f"<div>train<b>{fmt_score(report.initial_score)} &rarr; "
        f"{fmt_score(report.best_score)}</b></div>"
        f"<div>val<b>{fmt_score(report.initial_val_score)} &rarr; "
        f"{_val_score(report)}</b></div>"
        f"<div>steps<b>{len(report.steps)}</b></div>"
        f"<div>proposals<b>{len(report.proposals)}</b></div>"
        f"<div>est. cost<b>{esc(_cost(report))}</b></div></div>"
        f"<p>Initial train score {esc(_initial(report))}. Stopped: "
        f"{esc(report.stopped_reason)}. Calls: {esc(_calls(report))}; cache hits "
        f"{report.cache_hits}; errored examples {report.errors}; full-set validations "
        f"{report.full_evaluations}, cut by racing {report.raced_evaluations} "
        f"({report.examples_skipped_by_racing} examples skipped); wall time "
        f"{report.wall_time:.1f}s. Scores are conservative: an errored example counts as a "
        f"failure.</p>{notes}"
    )


def _pool_html(report: RunReport) -> str:
    """The Pareto pool as an HTML table (nothing without a pool)."""
    if not report.pool:
        return ""
    esc = html.escape
    rows = "".join(
        f'<tr class="{"ok" if c.on_front else "no"}"><td>#{c.id}</td><td>{c.step}</td>'
        f"<td>{esc(', '.join(f'#{i}' for i in c.parents) or '-')}</td>"
        f"<td>{fmt_score(c.val_score)}</td>"
        f"<td>{'-' if c.cost is None else f'{c.cost:.4g}'}</td>"
        f"<td>{'-' if c.length is None else c.length}</td>"
        f"<td>{esc(', '.join(c.leads)) if c.on_front else '-'}</td></tr>"
        for c in report.pool
    )
    return (
        "<h2>Candidate pool (Pareto front on the validation set)</h2>\n"
        "<table><tr><th>id</th><th>step</th><th>parents</th><th>val</th><th>cost/example</th>"
        f"<th>tokens</th><th>leads (front members)</th></tr>\n{rows}</table>\n"
    )


def render_html(report: RunReport) -> str:
    """The report as one self-contained HTML page."""
    diff = difflib.HtmlDiff(wrapcolumn=70).make_table(
        _prompt_text(report.initial_prompt),
        _prompt_text(report.best_prompt),
        "initial prompt",
        "best prompt",
        context=False,
    )
    steps, proposals = _tables(report)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Optimization report</title>
<style>{_STYLE}</style></head><body>
<h1>Optimization report</h1>
{_summary(report)}
<h2>Score per step</h2>
{_score_chart(report)}
<h2>Prompt: initial vs best</h2>
{diff}
<h2>Steps</h2>
<table><tr><th>step</th><th>batch</th><th>best train</th><th>val</th><th>proposals</th>
<th>outcome</th></tr>
{steps}</table>
<h2>Proposals</h2>
<table><tr><th>step.attempt.variant</th><th>batch</th><th>full</th><th>errored</th>
<th>outcome</th></tr>
{proposals}</table>
{_pool_html(report)}</body></html>
"""
