"""What ``--dry-run`` prints: a true upper bound of a run's calls, tokens and cost.

Every kind of call is bounded apart, on the model that serves it:

- calls: the trainer's loop at its longest (every step tries ``max_proposals_per_step``
  attempts, each with ``parallel_proposals`` proposals scored on the batch and the whole
  training set; the best prompt is scored on the validation set after every step);
- prompt tokens: every byte a token (no tokenizer makes more tokens than bytes), plus
  chat framing per message, for the longest row and the longest prompt that can be sent:
  a proposed prompt is at most the apply call's completion cap;
- completion tokens: the task prompt's ``max_tokens`` and the optimizer's
  `OPTIMIZER_MAX_TOKENS`, which the engine sends with each of its own calls.  A task
  prompt without ``max_tokens`` has no bound: the plan says so instead of a number.

Assumed, and said in the printed note: a metric's feedback text is at most
``_FEEDBACK_BYTES``, and providers bill no failed attempt (429, 5xx).

Hedged requests (``[<endpoint>.retry] hedge_after``) double the calls of the endpoint
that hedges: an attempt has at most one duplicate, a race both of whose attempts fail
bills nothing (as above), and the race that answers bills at most both of its attempts
(the loser is cancelled, but a provider may bill it in full).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._budget import Budget, Price
from .._prompt import Prompt, render_value
from .._types import Example
from ..stages import (
    APPLY_SYSTEM,
    DESCRIBE_MAX_TOKENS,
    GRADIENT_MAX_TOKENS,
    GRADIENT_SYSTEM,
    OPTIMIZER_MAX_TOKENS,
)
from ._runfile import EndpointSpec, RunFile

__all__ = ["CallKind", "plan", "plan_table"]

_FRAMING = 8  # tokens per chat message (role markers, separators), generously
_HEADINGS = 600  # bytes of section headings and labels the stages add around the parts
_FEEDBACK_BYTES = 2000  # a metric's feedback text, at most (assumed)
_DESCRIBE_SAMPLE = 3  # examples shown when the task description is generated
UNBOUNDED = "unbounded: set max_tokens in [prompt] params (a program: in every [prompts.NAME])"


@dataclass(frozen=True, slots=True)
class CallKind:
    """One kind of call: how many, on which model, and the tokens of each at most."""

    kind: str
    model: str
    calls: int
    prompt_tokens: int
    completion_tokens: int | None  # None: no cap is known

    def cost(self, price: Price | None) -> float | None:
        """The most these calls can cost; None without a price or a completion cap."""
        if price is None or self.completion_tokens is None:
            return None
        per_call = (
            self.prompt_tokens * price.input_per_million
            + self.completion_tokens * price.output_per_million
        )
        return self.calls * per_call / 1e6

    def row(self, price: Price | None) -> dict[str, Any]:
        cost = self.cost(price)
        return {
            "kind": self.kind,
            "model": self.model,
            "calls": self.calls,
            "max_prompt_tokens": self.prompt_tokens,
            "max_completion_tokens": self.completion_tokens
            if self.completion_tokens is not None
            else UNBOUNDED,
            "max_cost_usd": round_up(cost) if cost is not None else None,
        }


def round_up(value: float) -> float:
    """Up to the next 1/10,000 of a dollar: a printed bound never rounds below itself."""
    return math.ceil(value * 10_000) / 10_000


def _bytes(text: str) -> int:
    return len(text.encode("utf-8"))


def _prompt_bytes(prompt: Prompt) -> int:
    return _bytes(json.dumps([dict(m) for m in prompt.messages], ensure_ascii=False, indent=2))


def _tokens(nbytes: int, messages: int) -> int:
    return nbytes + _FRAMING * (messages + 1)


@dataclass(frozen=True, slots=True)
class _Sizes:
    """The longest parts a call can carry, in bytes (tokens for the caps)."""

    prompt: int  # the longest prompt that can be sent (initial or proposed), as JSON
    rendered_rows: int  # the longest rendered task request over every row
    row: int  # the longest inputs + expected, as the gradient stage shows them
    task_out: int | None  # the task call's completion cap
    opt_out: int  # the optimizer call's completion cap
    messages: int  # messages in the task prompt


def _sizes(run: RunFile, rows: Iterable[Example]) -> _Sizes:
    prompt = run.prompt
    prompts = list(run.prompts.values()) if run.prompts is not None else [prompt]
    template = sum(_bytes(m["content"]) for m in prompt.messages)
    rendered = row = 0
    for example in rows:
        if run.prompts is None:
            sent = sum(_bytes(m["content"]) for m in prompt.render(example.inputs))
            rendered = max(rendered, sent - template)  # what the row adds to the template
        else:  # a program may put any of the example's inputs into any of its prompts
            every = sum(_bytes(render_value(v)) for v in example.inputs.values())
            rendered = max(rendered, every)
        row = max(row, _bytes(render_value(dict(example.inputs)) + render_value(example.expected)))
    caps = [p.params.get("max_tokens") or p.params.get("max_completion_tokens") for p in prompts]
    cap = None if None in caps else max(int(c) for c in caps if c is not None)
    # a proposal is at most the apply call's completion: that many tokens, each of which
    # we count as a byte on the way back in (the byte rule bounds tokens, not the reverse)
    longest = max(*(_prompt_bytes(p) for p in prompts), OPTIMIZER_MAX_TOKENS)
    return _Sizes(
        prompt=longest,
        rendered_rows=longest + rendered,
        row=row,
        task_out=int(cap) if cap is not None else None,
        opt_out=OPTIMIZER_MAX_TOKENS,
        messages=max(len(p.messages) for p in prompts),
    )


def _optimizer_kinds(
    run: RunFile, sizes: _Sizes, counts: Mapping[str, int], attempts: int
) -> list[CallKind]:
    assert run.optimizer is not None
    name = run.optimizer.model_name or "?"
    out = sizes.opt_out
    description = 2 * out  # task and metric descriptions, generated or given
    prediction = sizes.task_out if sizes.task_out is not None else 0
    gradient = (
        _bytes(GRADIENT_SYSTEM)
        + _HEADINGS
        + description
        + sizes.prompt
        + sizes.row
        + prediction
        + _FEEDBACK_BYTES
        + (attempts - 1) * out
    )
    history = int(run.trainer.get("history_size", 4))
    batch = int(run.trainer.get("batch_size", 4))
    apply = (
        _bytes(APPLY_SYSTEM)
        + _HEADINGS * (2 + history)
        + out
        + sizes.prompt
        + batch * out
        + history * sizes.prompt
    )
    describe = _HEADINGS + max(
        _prompt_bytes(run.prompt) + _DESCRIBE_SAMPLE * sizes.row,
        20_000,  # the metric's source
    )
    gradient_out: int | None = out if sizes.task_out is not None else None
    # each kind's answer is capped by its own default (stages.*_MAX_TOKENS); what goes
    # into the prompts above is still counted at the overall cap, a looser true bound
    return [
        CallKind(
            "description", name, counts["description"], _tokens(describe, 2), DESCRIBE_MAX_TOKENS
        ),
        CallKind(
            "gradient",
            name,
            counts["gradient"],
            _tokens(gradient, 2),
            GRADIENT_MAX_TOKENS if gradient_out is not None else None,
        ),
        CallKind("apply", name, counts["apply"], _tokens(apply, 2), out),
    ]


def _hedges(spec: EndpointSpec | None) -> bool:
    return spec is not None and spec.retry is not None and spec.retry.hedge_after is not None


def _task_hedges(run: RunFile) -> bool:
    """Whether any endpoint that serves the task prompt(s) sends hedged requests."""
    return any(_hedges(spec) for spec in (run.model, run.batch, *run.adapters.values()))


def _doubled(kinds: list[CallKind], hedged: bool) -> list[CallKind]:
    """``kinds`` with their calls doubled when their endpoint hedges: one duplicate per
    attempt, both attempts of the answered race billed at most."""
    return [dataclasses.replace(k, calls=2 * k.calls) for k in kinds] if hedged else kinds


def _call_kinds(run: RunFile, command: str) -> list[CallKind]:
    sizes = _sizes(run, [*run.train, *(run.val or [])])
    task_kinds = _task_call_kinds(run, command, sizes)
    if command == "evaluate":
        return _doubled(task_kinds, _task_hedges(run))
    t = run.trainer
    b, m = int(t.get("batch_size", 4)), int(t.get("max_proposals_per_step", 5))
    steps = math.ceil(len(run.train) / b)
    p = int(t.get("parallel_proposals", 1))
    blame = steps * b if t.get("component") == "blame" else 0  # a program's blame pass
    counts = {"description": 2, "gradient": steps * m * b + blame, "apply": steps * m * p}
    return [
        *_doubled(task_kinds, _task_hedges(run)),
        *_doubled(_optimizer_kinds(run, sizes, counts, m), _hedges(run.optimizer)),
    ]


def _task_call_kinds(run: RunFile, command: str, sizes: _Sizes) -> list[CallKind]:
    task = run.prompt.model
    n, v = len(run.train), len(run.val or [])
    # A program's example makes its declared calls; any of them may carry the others'
    # answers as variables, so each call's prompt bound grows by their completion caps.
    per = sum(run.calls_per_example.values()) if run.prompts is not None else 1
    answers = (per - 1) * (sizes.task_out or 0)
    if command == "evaluate":
        template = sum(_bytes(m["content"]) for m in run.prompt.messages)
        each = _tokens(template + sizes.rendered_rows - sizes.prompt + answers, sizes.messages)
        return [CallKind("full set", task, n * per, each, sizes.task_out)]
    t = run.trainer
    b = int(t.get("batch_size", 4))
    m = int(t.get("max_proposals_per_step", 5))
    p = int(t.get("parallel_proposals", 1))
    steps = math.ceil(n / b)
    each = _tokens(sizes.rendered_rows + answers, sizes.messages)
    return [
        CallKind("initial", task, (n + v) * per, each, sizes.task_out),
        CallKind("batch", task, steps * (b + m * p * b) * per, each, sizes.task_out),
        CallKind("full set", task, steps * m * p * n * per, each, sizes.task_out),
        CallKind("validation", task, steps * v * per, each, sizes.task_out),
    ]


def plan(run: RunFile, command: str) -> dict[str, Any]:
    """The dry run's plan: a row per kind of call and model, and the totals."""
    prices = (run.budget or Budget()).price_table()
    kinds = [k for k in _call_kinds(run, command) if k.calls > 0]
    rows = [k.row(prices.get(k.model)) for k in kinds]
    costs = [k.cost(prices.get(k.model)) for k in kinds]
    total = round_up(sum(c for c in costs if c is not None)) if None not in costs else None
    unbounded = [k.kind for k in kinds if k.completion_tokens is None]
    unpriced = sorted({k.model for k in kinds if prices.get(k.model) is None})
    why = (
        f"{UNBOUNDED} (calls: {', '.join(unbounded)})"
        if unbounded
        else f"no price for model(s) {unpriced}: add them to [budget] prices"
        if unpriced
        else None
    )
    hedging = _task_hedges(run) or (command != "evaluate" and _hedges(run.optimizer))
    hedged = ", every hedged call's duplicate paid in full" if hedging else ""
    return {
        "command": command,
        "train_examples": len(run.train),
        "val_examples": len(run.val or []),
        "max_calls": sum(k.calls for k in kinds),
        "calls": rows,
        "max_cost_usd": total,
        **({"max_cost_usd_note": why} if why else {}),
        "note": "true upper bound: every byte a token, every completion at its cap, every "
        f"attempt made{hedged}; assumes metric feedback under {_FEEDBACK_BYTES} bytes and no "
        "billed failed attempts. Cache hits and racing only lower it; a resumed run pays only "
        "for misses",
    }


def plan_table(summary: Mapping[str, Any]) -> str:
    """The plan's rows as a text table, for people (stdout keeps the JSON)."""
    lines = [
        f"{'kind':<12} {'model':<16} {'calls':>7} {'prompt tok':>10} "
        f"{'compl. tok':>10} {'max $':>10}"
    ]
    for row in summary["calls"]:
        out = row["max_completion_tokens"]
        cost = row["max_cost_usd"]
        lines.append(
            f"{row['kind']:<12} {row['model']:<16} {row['calls']:>7} "
            f"{row['max_prompt_tokens']:>10} {out if isinstance(out, int) else 'unbounded':>10} "
            f"{f'{cost:.4f}' if cost is not None else '?':>10}"
        )
    total = summary["max_cost_usd"]
    lines.append(
        f"at most {summary['max_calls']} calls, "
        + (f"${total:.4f}" if total is not None else summary.get("max_cost_usd_note", "$?"))
    )
    return "\n".join(lines) + "\n"
