"""A run report as Markdown and as one self-contained HTML page.

Both say what a user who ships the winning prompt needs: the conservative score every
decision used, the mean over scored examples beside it with the error count, why the
run stopped, any note (racing off), and what became of every proposal.
"""

from __future__ import annotations

import difflib
import html
import math
import re
from itertools import zip_longest
from typing import Any

from .._svg import Series, chart
from ._records import ProposalRecord, RunRecord, fmt_score, score_series, step_outcome

__all__ = ["render_html", "render_markdown"]

_COLORS = ("#1f6feb", "#d97706")
_INITIAL_OUTCOME = "initial prompt (full training set)"
_STEPS_NOTE = (
    "Step 0 is the initial prompt; step k is the k-th batch. batch: the best prompt's score "
    "on that batch before any proposal; best train: on the full training set after the step."
)


def _initial(report: RunRecord) -> str:
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


def _warnings(report: RunRecord) -> list[str]:
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


def _cost(report: RunRecord) -> str:
    return f"${report.cost:.4f}" if report.cost is not None else "unknown (no price)"


def _calls(report: RunRecord) -> str:
    per_model = ", ".join(f"{m}: {n}" for m, n in sorted(report.calls.items()))
    return f"{sum(report.calls.values())} ({per_model})"


def _hedges(report: RunRecord) -> str:
    """What hedged requests sent and cost ('' when no model hedged)."""
    hedges = report.hedges
    if not hedges:
        return ""
    tokens = sum(sum(pair) for pair in hedges["tokens"].values())
    cost = hedges["cost"]
    dollars = f", ${cost:.4f}" if cost is not None else ""
    return (
        f"{hedges['sent']} duplicate requests sent, {hedges['won']} answered first; "
        f"estimated {tokens} tokens{dollars}, included in the calls, tokens and cost"
    )


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


def _pool(report: RunRecord) -> list[str]:
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


def _program(report: RunRecord) -> list[str]:
    """A program's prompts: the step that changed each, its calls and cache hits, and
    its diff from the initial version (nothing for one prompt)."""
    if not report.program:
        return []
    stages = report.program.get("stages", {})
    lines = [
        "",
        f"## Program (one prompt per step: {report.program.get('component')})",
        "",
        "| prompt | changed at step | paid calls | cache hits |",
        "|---|---|---:|---:|",
    ]
    prompts: dict[str, Any] = report.program.get("prompts", {})
    for name, entry in prompts.items():
        counts = stages.get(name, {})
        changed = ", ".join(str(step) for step in entry["changed_at"]) or "-"
        lines.append(
            f"| {name} | {changed} | {counts.get('calls', 0)} | {counts.get('cache_hits', 0)} |"
        )
    for name, entry in prompts.items():
        diff = list(
            difflib.unified_diff(
                _prompt_text(entry["initial"]),
                _prompt_text(entry["best"]),
                f"{name} (initial)",
                f"{name} (best)",
                lineterm="",
            )
        )
        lines += ["", f"### {name}", "", "```diff", *(diff or ["(unchanged)"]), "```"]
    return lines


def _val_score(report: RunRecord) -> str:
    """The best prompt's val score; with a validation set but none for the best prompt
    (the run stopped before its validation run), say so rather than show another's."""
    if report.val_score is None and report.initial_val_score is not None:
        return "not measured"
    return fmt_score(report.val_score)


def render_markdown(report: RunRecord) -> str:
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
        *([f"- hedges: {_hedges(report)}"] if report.hedges else []),
        f"- full-set validations: {report.full_evaluations}, cut by racing: "
        f"{report.raced_evaluations} ({report.examples_skipped_by_racing} examples skipped)",
        f"- wall time: {report.wall_time:.1f}s",
        "- scores are conservative: an errored example counts as a failure",
        "",
        "## Steps",
        "",
        _STEPS_NOTE,
        "",
        f"| step | batch | best {report.judged_on} | val | proposals | outcome |",
        "|---:|---:|---:|---:|---:|---|",
        f"| 0 | - | {fmt_score(report.initial_score)} | {fmt_score(report.initial_val_score)} "
        f"| - | {_INITIAL_OUTCOME} |",
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
    lines += _program(report)
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


def _marked_words(old: str, new: str) -> tuple[str, str]:
    """Both lines escaped, the words that differ wrapped in <del> (old) and <ins> (new)."""
    a, b = re.findall(r"\s+|\S+", old), re.findall(r"\s+|\S+", new)
    left: list[str] = []
    right: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        was, now = html.escape("".join(a[i1:i2])), html.escape("".join(b[j1:j2]))
        if tag == "equal":
            left.append(was)
            right.append(now)
            continue
        left.append(f"<del>{was}</del>" if was else "")
        right.append(f"<ins>{now}</ins>" if now else "")
    return "".join(left), "".join(right)


def _diff_rows(old: list[str], new: list[str]) -> list[tuple[str, str, str]]:
    """(kind, old cell, new cell) per row of a side-by-side diff; kind is one of same,
    chg, del, add.  A missing side is an empty cell."""
    rows: list[tuple[str, str, str]] = []
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        for a, b in zip_longest(old[i1:i2], new[j1:j2]):
            if tag == "equal":
                rows.append(("same", html.escape(a), html.escape(b)))
            elif a is not None and b is not None:
                rows.append(("chg", *_marked_words(a, b)))
            elif a is not None:
                rows.append(("del", html.escape(a), ""))
            else:
                rows.append(("add", "", html.escape(b)))
    return rows


def _diff_table(report: RunRecord) -> str:
    """The initial and best prompts side by side, words wrapping at spaces; on a narrow
    screen (CSS only) one column: unchanged lines once, a changed line old then new."""
    rows = "".join(
        f'<tr class="{kind}"><td class="old">{a}</td><td class="new">{b}</td></tr>'
        for kind, a, b in _diff_rows(
            _prompt_text(report.initial_prompt), _prompt_text(report.best_prompt)
        )
    )
    return (
        '<p class="legend"><del>red</del>: only in the initial prompt; '
        "<ins>green</ins>: only in the best prompt</p>"
        '<table class="diff"><thead><tr><th>initial prompt</th><th>best prompt</th></tr>'
        f"</thead><tbody>{rows}</tbody></table>"
    )


def _points(values: list[float | None]) -> list[tuple[float, float]]:
    """(step, score) for every step that has a score (none, or NaN, is a gap)."""
    return [(float(i), v) for i, v in enumerate(values) if v is not None and not math.isnan(v)]


def _score_chart(report: RunRecord) -> str:
    """The chart twice: a broad one, and a narrow one for a phone, whose labels stay
    legible where the broad one scaled down would shrink them to half size."""
    series = [
        Series(label, color, _points(values))
        for (label, values), color in zip(score_series(report), _COLORS, strict=False)
    ]
    broad, narrow = (
        chart(
            "score per step",
            series,
            x_label="step, as in the Steps table; 0 is the initial prompt",
            width=width,
            height=260,
            y_max=1.0,
            integer_x=True,
        )
        for width in (640, 350)
    )
    return f'<div class="broad">{broad}</div><div class="narrow">{narrow}</div>'


def _tables(report: RunRecord) -> tuple[str, str]:
    esc = html.escape
    initial = (
        f'<tr class="init"><td>0</td><td>-</td><td>{fmt_score(report.initial_score)}</td>'
        f"<td>{fmt_score(report.initial_val_score)}</td><td>-</td>"
        f"<td>{_INITIAL_OUTCOME}</td></tr>"
    )
    steps = initial + "".join(
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


# Narrow screens (a phone is about 390 px): everything wraps at word boundaries, the
# chart scales down, a table wider than the screen scrolls inside its own box, and the
# diff folds into one column.  Only a token longer than a whole column is broken.
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; padding: 1rem 1.25rem;
  max-width: 1100px; color: #111; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
p { overflow-wrap: break-word; }
table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f8fa; }
.wide { overflow-x: auto; max-width: 100%; }
.kpi { display: flex; flex-wrap: wrap; gap: .75rem 2rem; }
.kpi div { background: #f6f8fa; padding: .6rem 1rem; }
.kpi b { font-size: 1.3rem; display: block; white-space: nowrap; }
svg { max-width: 100%; height: auto; }
tr.ok td { background: #e6ffec; } tr.init td { background: #f6f8fa; }
ins { background: #abf2bc; text-decoration: none; }
del { background: #ffc1c0; text-decoration: none; }
table.diff { width: 100%; table-layout: fixed; font: 12px/1.5 ui-monospace, monospace; }
table.diff th { font-family: system-ui, sans-serif; width: 50%; }
table.diff td { white-space: pre-wrap; overflow-wrap: break-word; vertical-align: top; }
table.diff td + td, table.diff th + th { border-left: 1px solid #d0d7de; }
tr.chg td.old, tr.del td.old { background: #ffebe9; }
tr.chg td.new, tr.add td.new { background: #e6ffec; }
tr.del td.new, tr.add td.old { background: #f6f8fa; }
.narrow { display: none; }
@media (max-width: 640px) {
  body { padding: .75rem; }
  .narrow { display: block; } .broad { display: none; }
  td, th { padding: 3px 4px; } table.steps, table.proposals { font-size: 13px; }
  table.diff, table.diff tbody, table.diff tr, table.diff td { display: block; width: auto; }
  table.diff thead, tr.same td.new, table.diff td:empty { display: none; }
  table.diff td + td { border-left: 0; }
  tr.chg td.old::before, tr.del td.old::before { content: "- "; }
  tr.chg td.new::before, tr.add td.new::before { content: "+ "; }
}
"""


def _summary(report: RunRecord) -> str:
    esc = html.escape
    notes = "".join(f"<p><b>Note:</b> {esc(note)}</p>" for note in report.notes)
    notes += "".join(f"<p><b>Warning:</b> {esc(line)}</p>" for line in _warnings(report))
    hedges = f"<p>Hedges: {esc(_hedges(report))}.</p>" if report.hedges else ""
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
        f"failure.</p>{hedges}{notes}"
    )


def _pool_html(report: RunRecord) -> str:
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


def _program_html(report: RunRecord) -> str:
    """A program's section: the Markdown one, preformatted (empty for one prompt)."""
    lines = _program(report)
    if not lines:
        return ""
    return f"<h2>Program</h2>\n<pre>{html.escape(chr(10).join(lines[2:]))}</pre>\n"


def render_html(report: RunRecord) -> str:
    """The report as one self-contained HTML page (no scripts), readable from a phone's
    width up."""
    steps, proposals = _tables(report)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Optimization report</title>
<style>{_STYLE}</style></head><body>
<h1>Optimization report</h1>
{_summary(report)}
<h2>Score per step</h2>
{_score_chart(report)}
<h2>Prompt: initial vs best</h2>
{_diff_table(report)}
<h2>Steps</h2>
<p>{_STEPS_NOTE}</p>
<div class="wide"><table class="steps"><thead><tr><th>step</th><th>batch</th>
<th>best train</th><th>val</th><th>pro&shy;posals</th><th>outcome</th></tr></thead>
<tbody>{steps}</tbody></table></div>
<h2>Proposals</h2>
<div class="wide"><table class="proposals"><thead><tr><th>step.<wbr>attempt.<wbr>variant</th>
<th>batch</th><th>full</th><th>errored</th><th>outcome</th></tr></thead>
<tbody>{proposals}</tbody></table></div>
{_pool_html(report)}{_program_html(report)}</body></html>
"""
