"""The stage toolkit: the gradient and apply stages, their contexts and helpers.

    gradient(GradientContext) -> str      feedback for one failed example
    apply(ApplyContext) -> Prompt         a new prompt from the joined feedback

Stages are plain async callables, replaceable by the caller
(``optimize(..., gradient=..., apply=...)``).  The defaults (`LLMGradient`, `LLMApply`)
are LLM calls on the optimizer endpoint with the prompts written here, made through an
`OptimizerCaller` (limits, budget, events, and the run's replay cache).  Whatever a
stage returns, the trainer validates the proposal (`validate_proposal`); a stage that
raises `ProposalError` records a failed attempt.  `parse_proposal` reads an LLM's JSON
answer into a `Prompt`, for stages of your own.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from ._budget import BudgetMeter
from ._errors import ConfigError, EngineError, StageError
from ._events import Emitter
from ._parsing import parse_json_object
from ._prompt import Prompt, canonical_json, normalise_numbers, render_value
from ._types import Example, MetricResult, ProgramCall
from .cache import Cache
from .endpoint import Endpoint, estimate_text_tokens

__all__ = [
    "APPLY_ROOM_TOKENS",
    "BLAME_LINE",
    "DESCRIBE_MAX_TOKENS",
    "GRADIENT_MAX_TOKENS",
    "OPTIMIZER_MAX_TOKENS",
    "ApplyContext",
    "ApplyStage",
    "GradientContext",
    "GradientStage",
    "HistoryEntry",
    "LLMApply",
    "LLMGradient",
    "OptimizerCaller",
    "ProposalError",
    "StageError",
    "apply_max_tokens",
    "describe_metric_messages",
    "describe_task_messages",
    "escape_surrogates",
    "optimizer_text",
    "parse_json_object",
    "parse_proposal",
    "validate_proposal",
]


def escape_surrogates(text: str) -> str:
    """``text`` with any lone surrogate (half an emoji from a JSON ``\\ud83d``) written
    as its escape, so it can be encoded, hashed and stored: escaped, never dropped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class ProposalError(EngineError):
    """A proposed prompt is unusable; ``raw`` keeps what the stage returned."""

    def __init__(self, message: str, *, raw: str | None = None) -> None:
        self.raw = escape_surrogates(raw) if raw is not None else None
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class GradientContext:
    """Everything the gradient stage sees for one failed example, all at once."""

    task_description: str
    metric_description: str
    prompt: Prompt
    example: Example
    prediction: str
    result: MetricResult
    earlier_feedback: tuple[str, ...]  # this example's feedback earlier in this batch
    # a program: every lm call of this example, every prompt by name, and the prompt this
    # step improves ("" when the gradient is asked to name the prompt at fault: blame)
    trace: tuple[ProgramCall, ...] = ()
    program_prompts: Mapping[str, Prompt] | None = None
    stage: str = ""
    truncated: bool = False  # the prediction was cut at the length cap (max_tokens)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A recent proposal and what became of it.

    ``score`` is the accepted proposal's training score, 0 for one that did not beat
    the batch, and the best score it failed to beat for one rejected on the full set
    (its exact score is unknown when racing cut it, so it is never shown).  ``note``
    says which, in words.
    """

    prompt: Prompt
    score: float
    note: str = ""

    def heading(self) -> str:
        """How the default apply prompt introduces this proposal."""
        return f"Proposal: {self.note}" if self.note else f"Proposal scored {self.score:.3f}"


@dataclass(frozen=True, slots=True)
class ApplyContext:
    """What the apply stage sees: the prompt, all feedback joined, recent proposals."""

    task_description: str
    prompt: Prompt
    feedback: tuple[str, ...]
    history: tuple[HistoryEntry, ...]
    variant: int = 0  # index among parallel proposals of one attempt


GradientStage = Callable[[GradientContext], Awaitable[str]]

ApplyStage = Callable[[ApplyContext], Awaitable[Prompt]]


# Every optimizer call the engine makes (gradient, apply, descriptions) asks for at most
# this many completion tokens, so a dry run can bound what they cost (engine.cli._plan).
OPTIMIZER_MAX_TOKENS = 4096

# Default ``max_tokens`` of the engine's own calls, sized to what each answer holds: a
# model without a cap (a small local one) may otherwise ramble to its context's end.
DESCRIBE_MAX_TOKENS = 200
"""A task or metric description: two or three sentences, with room to spare."""
GRADIENT_MAX_TOKENS = 256
"""Feedback on one failure: two to four sentences (about 100 tokens), with room."""
APPLY_ROOM_TOKENS = 512
"""A new prompt: the current prompt's length twice over (JSON quoting, additions) plus
this much room."""


def apply_max_tokens(prompt: Prompt) -> int:
    """The default ``max_tokens`` of the apply call rewriting ``prompt``, at most
    `OPTIMIZER_MAX_TOKENS` (so a dry run's bound holds however long prompts grow)."""
    return min(
        2 * estimate_text_tokens(_messages_json(prompt)) + APPLY_ROOM_TOKENS, OPTIMIZER_MAX_TOKENS
    )


def _messages_json(prompt: Prompt) -> str:
    return json.dumps([dict(m) for m in prompt.messages], ensure_ascii=False, indent=2)


GRADIENT_SYSTEM = """\
You are an expert prompt engineer diagnosing one failure of a language-model prompt.
You are shown everything at once: the task, how answers are scored, the current prompt,
the example's inputs, the expected output, the model's prediction, and the metric's
score and feedback. Explain concretely what in the prompt led to this failure and
exactly what instruction to add or change in the prompt to fix it. Be specific to this
failure, in two to four sentences. Do not rewrite the whole prompt. If earlier feedback
on this example is listed, it did not fix the failure: say something different."""

APPLY_SYSTEM = """\
You improve a language-model prompt by applying feedback to it. Return the complete new
prompt as JSON and nothing else: {"messages": [{"role": "system" | "user" | "assistant",
"content": "..."}]}.
Rules: keep every {placeholder} exactly as written (each is filled with an example's
inputs) and add no new ones; keep every instruction about the response format; stay
close to the current prompt's length; change what the feedback asks for; do better than
the recent proposals listed with their scores."""

PROMPT_SCHEMA: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "role": {"type": "string", "enum": ["system", "user", "assistant"]},
                    "content": {"type": "string"},
                },
                "required": ["role", "content"],
            },
        }
    },
    "required": ["messages"],
}


async def optimizer_text(
    endpoint: Endpoint,
    messages: list[dict[str, str]],
    params: Mapping[str, Any],
    *,
    meter: BudgetMeter | None = None,
    events: Emitter | None = None,
    cache: Cache | None = None,
    request_counts: dict[str, int] | None = None,
) -> str:
    """One optimizer call's answer text, through the cache when there is one.

    ``request_counts`` (one dict per run) numbers identical requests within the run, so
    a repeated request is a fresh sample, while a resumed run, asking the same requests
    in the same order, replays them from the cache instead of paying again.
    """

    async def call() -> str:
        result = await endpoint.complete(messages, params, events=events, meter=meter)
        return result.completion.text

    if cache is None:
        return await call()
    request: dict[str, Any] = {
        "messages": messages,
        "params": normalise_numbers(dict(params)),
        "endpoint": endpoint.cache_identity,
    }
    if request_counts is not None:
        digest = hashlib.sha256(canonical_json(request).encode()).hexdigest()
        request_counts[digest] = request_counts.get(digest, 0) + 1
        request["occurrence"] = request_counts[digest]
    text, _ = await cache.call_text(request, call)
    return text


class OptimizerCaller:
    """How the optimizer endpoint is called: limits, budget, events and the run's replay
    cache.  The default stages are built on it; the trainer uses it for descriptions.

    Parameters:
        endpoint: the optimizer `Endpoint`.
        model: the model name sent with each call.
        temperature: sampling temperature of the calls.
        meter, events: the run's budget meter and event emitter.
        cache, request_counts: replay of identical requests on a resumed run (see
            `optimizer_text`).
        max_tokens: the cap on each answer; ``None``: the stage's default
            (`DESCRIBE_MAX_TOKENS`, `GRADIENT_MAX_TOKENS`, `apply_max_tokens`).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        model: str,
        temperature: float = 0.0,
        meter: BudgetMeter | None = None,
        events: Emitter | None = None,
        cache: Cache | None = None,
        request_counts: dict[str, int] | None = None,
        max_tokens: int | None = None,
    ) -> None:
        if max_tokens is not None and max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.endpoint = endpoint
        self.model = model
        self.temperature = temperature
        self.meter = meter
        self.events = events
        self.cache = cache
        self.request_counts = request_counts

    @classmethod
    def sharing(cls, caller: OptimizerCaller) -> Self:
        """A stage that calls the optimizer exactly as ``caller`` does (same endpoint,
        budget, events, replay cache and request numbering)."""
        return cls(
            caller.endpoint,
            model=caller.model,
            temperature=caller.temperature,
            meter=caller.meter,
            events=caller.events,
            cache=caller.cache,
            request_counts=caller.request_counts,
            max_tokens=caller.max_tokens,
        )

    async def ask(self, messages: list[dict[str, str]], params: Mapping[str, Any]) -> str:
        """The answer text to ``messages`` with ``params`` (model, temperature, ...);
        ``max_tokens`` is `OPTIMIZER_MAX_TOKENS` unless ``params`` sets it."""
        return await optimizer_text(
            self.endpoint,
            messages,
            {"max_tokens": OPTIMIZER_MAX_TOKENS, **params},
            meter=self.meter,
            events=self.events,
            cache=self.cache,
            request_counts=self.request_counts,
        )

    async def ask_text(self, messages: list[dict[str, str]]) -> str:
        """The stripped answer to ``messages`` with this caller's model and temperature."""
        params = {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens or DESCRIBE_MAX_TOKENS,
        }
        return (await self.ask(messages, params)).strip()


class LLMGradient(OptimizerCaller):
    """The default gradient stage: one optimizer call per failed example."""

    def messages(self, ctx: GradientContext) -> list[dict[str, str]]:
        shown = (
            [f"## Current prompt\n{_messages_json(ctx.prompt)}"]
            if ctx.program_prompts is None
            else _program_parts(ctx, ctx.program_prompts)
        )
        parts = [
            f"## Task\n{ctx.task_description}",
            f"## Metric\n{ctx.metric_description}",
            *shown,
            f"## Inputs\n{render_value(dict(ctx.example.inputs))}",
            f"## Expected output\n{render_value(ctx.example.expected)}",
            f"## Prediction\n{ctx.prediction}"
            + (
                "\n(This answer was cut at the length limit, max_tokens: the model did "
                "not finish it. A prompt that asks for a brief answer may fix it.)"
                if ctx.truncated
                else ""
            ),
            f"## Metric result\nscore: {ctx.result.score:g}\n"
            f"feedback: {ctx.result.feedback or '-'}",
        ]
        if ctx.earlier_feedback:
            earlier = "\n".join(f"- {f}" for f in ctx.earlier_feedback)
            parts.append(
                "## Earlier feedback on this example (it did not fix it; say something "
                f"different)\n{earlier}"
            )
        return [
            {"role": "system", "content": GRADIENT_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    async def __call__(self, ctx: GradientContext) -> str:
        params = {
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens or GRADIENT_MAX_TOKENS,
        }
        text = await self.ask(self.messages(ctx), params)
        return text.strip()


BLAME_LINE = "STAGE:"  # the first line of a blame gradient: ``STAGE: <prompt name>``


def _program_parts(ctx: GradientContext, prompts: Mapping[str, Prompt]) -> list[str]:
    """A program's prompts, the example's whole trace, and which prompt to work on."""
    listed = "\n\n".join(f"### {name}\n{_messages_json(p)}" for name, p in prompts.items())
    calls = "\n".join(
        f"{i}. lm({call.prompt!r}, {render_value(dict(call.variables))}) -> "
        + (call.output if call.output is not None else f"error: {call.error}")
        for i, call in enumerate(ctx.trace, 1)
    )
    if ctx.stage:
        target = (
            f"## Prompt to improve\n{ctx.stage}: give feedback on this prompt only (the "
            "others stay as they are)."
        )
    else:
        target = (
            f"## Prompt at fault\nStart your answer with one line `{BLAME_LINE} <name>` "
            f"naming the prompt most to blame for this failure (one of {sorted(prompts)}), "
            "then give feedback on that prompt only."
        )
    return [
        f"## The program's prompts (a pipeline; each is called by name)\n{listed}",
        f"## Trace of this example (every call, in order)\n{calls or '(no call)'}",
        target,
    ]


class LLMApply(OptimizerCaller):
    """The default apply stage: one optimizer call returning JSON messages."""

    def messages(self, ctx: ApplyContext) -> list[dict[str, str]]:
        feedback = "\n".join(f"{i}. {f}" for i, f in enumerate(ctx.feedback, 1))
        parts = [
            f"## Task\n{ctx.task_description}",
            f"## Current prompt\n{_messages_json(ctx.prompt)}",
            f"## Feedback to apply\n{feedback}",
        ]
        if ctx.history:
            shown = "\n\n".join(
                f"### {h.heading()}\n{_messages_json(h.prompt)}" for h in ctx.history
            )
            parts.append(f"## Recent proposals and their scores\n{shown}")
        if ctx.variant:
            parts.append(
                f"## Variant\nThis is alternative #{ctx.variant + 1}: take a different angle."
            )
        return [
            {"role": "system", "content": APPLY_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    async def __call__(self, ctx: ApplyContext) -> Prompt:
        temperature = self.temperature if not ctx.variant else max(self.temperature, 0.7)
        params: dict[str, Any] = {
            "model": self.model,
            "temperature": temperature,
            "max_tokens": self.max_tokens or apply_max_tokens(ctx.prompt),
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "prompt", "schema": dict(PROMPT_SCHEMA)},
            },
        }
        text = await self.ask(self.messages(ctx), params)
        return parse_proposal(text, ctx.prompt)


def parse_proposal(text: str, current: Prompt) -> Prompt:
    """Read a proposal (``{"messages": [...]}``, a bare list, fenced or amid prose) into
    a prompt with the current model, params and response format."""
    data: Any = parse_json_object(text)
    messages: Any = data.get("messages") if isinstance(data, dict) else None
    if messages is None:
        match = re.search(r"\[.*\]", text, re.DOTALL)
        if match:
            try:
                messages = json.loads(match.group(0))
            except ValueError:
                messages = None
    if not isinstance(messages, list) or not messages:
        raise ProposalError("the proposal is not a JSON list of messages", raw=text)
    cleaned: list[dict[str, str]] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ProposalError("a proposed message lacks string content", raw=text)
        if escape_surrogates(m["content"]) != m["content"]:
            raise ProposalError(
                "the proposal holds a lone surrogate (half of an emoji), not valid Unicode",
                raw=text,
            )
        cleaned.append({"role": str(m.get("role", "system")), "content": m["content"]})
    try:
        return current.replace(messages=cleaned)
    except ConfigError as exc:
        raise ProposalError(f"the proposal is not a valid prompt: {exc}", raw=text) from exc


_FORMAT_WORDS = ("json",)


def validate_proposal(proposal: Prompt, original: Prompt) -> None:
    """Raise `ProposalError` unless ``proposal`` keeps the original's inputs and format.

    Checked: same placeholders (none dropped, none invented), no empty message, the
    same model, params and response format, and a response-format instruction
    (mentions of JSON) kept when the original has one.
    """
    raw = json.dumps(proposal.to_dict(), ensure_ascii=False)
    dropped = original.placeholders - proposal.placeholders
    if dropped:
        raise ProposalError(f"the proposal drops placeholder(s) {sorted(dropped)}", raw=raw)
    invented = proposal.placeholders - original.placeholders
    if invented:
        raise ProposalError(f"the proposal invents placeholder(s) {sorted(invented)}", raw=raw)
    if any(not m["content"].strip() for m in proposal.messages):
        raise ProposalError("the proposal has an empty message", raw=raw)
    if (
        proposal.model != original.model
        or proposal.params != original.params
        or proposal.response_format != original.response_format
    ):
        raise ProposalError("the proposal changes the model, params or response format", raw=raw)
    before = " ".join(m["content"] for m in original.messages).casefold()
    after = " ".join(m["content"] for m in proposal.messages).casefold()
    for word in _FORMAT_WORDS:
        if word in before and word not in after:
            raise ProposalError(
                f"the proposal drops the response-format instruction ({word})", raw=raw
            )


def describe_task_messages(prompt: Prompt, sample: Sequence[Example]) -> list[dict[str, str]]:
    """The optimizer request that writes a task description from the prompt and a
    few examples (used when the caller gives none)."""
    shown = "\n".join(
        f"- inputs: {render_value(dict(e.inputs))} -> expected: {render_value(e.expected)}"
        for e in sample
    )
    return [
        {
            "role": "system",
            "content": "Describe the task this prompt performs in two or three sentences: "
            "what the inputs are, what the output must be, and its format.",
        },
        {"role": "user", "content": f"## Prompt\n{_messages_json(prompt)}\n\n## Examples\n{shown}"},
    ]


def describe_metric_messages(source: str) -> list[dict[str, str]]:
    """The optimizer request that describes a metric from its source code."""
    return [
        {
            "role": "system",
            "content": "Describe in two sentences how this metric scores an answer and what "
            "an answer needs to get full marks.",
        },
        {"role": "user", "content": f"## Metric source\n{source}"},
    ]
