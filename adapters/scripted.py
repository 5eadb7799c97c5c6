"""A deterministic, in-process chat model for tests, benchmarks and the demo.

`ScriptedModel` wraps a handler function the way httpx's ``MockTransport`` does: the
handler gets the request and returns the answer text (or a `Completion`), sync or
async.  Latency and faults are injected around it, and every request is logged with
its arrival time so tests can count what the *provider* saw.

`ArithmeticModel` is the demo task's model: it really computes the answer to
"What is 17 + 25?", but keeps bad habits (chatty answers, digits spelled out, a sloppy
multiplication) unless the prompt's text tells it not to, so a better prompt really
scores better.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from engine import Completion, Example, Limits, RateLimitedError, TransientError, Usage

__all__ = [
    "ArithmeticCoach",
    "ArithmeticModel",
    "FaultPlan",
    "ScriptedModel",
    "ScriptedRequest",
    "arithmetic_examples",
    "transient_faults",
]


@dataclass(frozen=True, slots=True)
class ScriptedRequest:
    """One request as the scripted provider received it."""

    messages: tuple[Mapping[str, str], ...]
    params: Mapping[str, Any]
    time: float
    attempt: int  # how many times this exact request had been seen before, plus one

    @property
    def text(self) -> str:
        return "\n".join(m["content"] for m in self.messages)


Handler = Callable[[ScriptedRequest], "str | Completion | Awaitable[str | Completion]"]
FaultPlan = Callable[[ScriptedRequest], "BaseException | None"]
"""Decides, per request, whether to fail it (return the exception to raise) or not."""


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from its parts."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def transient_faults(rate: float, *, seed: int = 0, retry_after: float | None = None) -> FaultPlan:
    """Fail each attempt with probability ``rate``, deterministically per (request, attempt).

    Raises `TransientError` (or `RateLimitedError` when ``retry_after`` is given).
    """

    def plan(request: ScriptedRequest) -> BaseException | None:
        if _unit(seed, request.text, request.params.get("model"), request.attempt) >= rate:
            return None
        if retry_after is not None:
            return RateLimitedError(retry_after=retry_after, endpoint="scripted")
        return TransientError("injected transient failure", endpoint="scripted", status=503)

    return plan


@dataclass
class _Stats:
    requests: list[ScriptedRequest] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    faults: int = 0
    completed: int = 0
    cancelled: int = 0


class ScriptedModel:
    """A chat model around ``handler``; implements `engine.ChatModel`.

    Parameters:
        handler: ``(ScriptedRequest) -> str | Completion`` (sync or async).
        latency: seconds per call, or ``(rng) -> seconds`` for a distribution.
        faults: a `FaultPlan` deciding which attempts fail.
        limits: carried for `engine.Endpoint` to pick up.
        keep_requests: log every request (turn off for million-call benchmarks).
        seed: seeds the latency distribution.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        latency: float | Callable[[random.Random], float] = 0.0,
        faults: FaultPlan | None = None,
        limits: Limits | None = None,
        name: str = "scripted",
        keep_requests: bool = True,
        seed: int = 0,
    ) -> None:
        self.handler = handler
        self.latency = latency
        self.faults = faults
        self.limits = limits
        self.name = name
        self.keep_requests = keep_requests
        self._rng = random.Random(seed)
        self._seen: dict[str, int] = {}
        self.stats = _Stats()

    @property
    def requests(self) -> list[ScriptedRequest]:
        return self.stats.requests

    @property
    def calls(self) -> int:
        """Requests received (every attempt counts: this is what a provider bills)."""
        return (
            len(self.stats.requests)
            if self.keep_requests
            else self.stats.completed + self.stats.faults
        )

    def request_times(self) -> list[float]:
        return [r.time for r in self.stats.requests]

    async def complete(self, messages: Sequence[Mapping[str, str]], /, **params: Any) -> Completion:
        msgs = tuple(dict(m) for m in messages)
        text_key = repr((msgs, sorted(params.items(), key=lambda kv: kv[0])))
        attempt = self._seen.get(text_key, 0) + 1
        if self.keep_requests:
            self._seen[text_key] = attempt
        request = ScriptedRequest(msgs, dict(params), anyio.current_time(), attempt)
        stats = self.stats
        if self.keep_requests:
            stats.requests.append(request)
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            delay = self.latency(self._rng) if callable(self.latency) else self.latency
            if delay > 0:
                await anyio.sleep(delay)
            fault = self.faults(request) if self.faults is not None else None
            if fault is not None:
                stats.faults += 1
                raise fault
            answer = self.handler(request)
            if inspect.isawaitable(answer):
                answer = await answer
            stats.completed += 1
        except anyio.get_cancelled_exc_class():
            stats.cancelled += 1
            raise
        finally:
            stats.in_flight -= 1
        if isinstance(answer, Completion):
            return answer
        prompt_tokens = sum(len(m["content"]) for m in msgs) // 4 + 1
        return Completion(
            text=answer,
            usage=Usage(prompt_tokens, len(answer) // 4 + 1),
            model=str(params.get("model", self.name)),
            finish_reason="stop",
        )

    def __repr__(self) -> str:
        return f"<ScriptedModel {self.name!r} calls={self.calls}>"


# -- the demo task ----------------------------------------------------------------------

_QUESTION = re.compile(r"what is\s+(-?\d+)\s*([-+*x×])\s*(-?\d+)", re.IGNORECASE)
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _spell(n: int) -> str:
    return " ".join(_ONES[int(d)] for d in str(abs(n)))


class ArithmeticModel(ScriptedModel):
    """The demo task's model: answers "What is A op B?" with habits a prompt can fix.

    Habits, each dropped when the prompt (any message, case-insensitive) says so:

    - chatty: "The answer is 42." unless the prompt asks for ``only the number``;
    - spelled: spells the digits ("four two") unless it asks for ``digits``;
    - sloppy: multiplications come out off by one unless it says ``carefully``.

    With ``habits`` you choose which are active, e.g. ``{"chatty"}`` for a task that
    one instruction fixes entirely.
    """

    INSTRUCTIONS: Mapping[str, str] = {
        "chatty": "only the number",
        "spelled": "digits",
        "sloppy": "carefully",
    }

    def __init__(
        self, *, habits: Sequence[str] = ("chatty", "spelled", "sloppy"), **kwargs: Any
    ) -> None:
        unknown = set(habits) - set(self.INSTRUCTIONS)
        if unknown:
            raise ValueError(f"unknown habits {sorted(unknown)}")
        self.habits = frozenset(habits)
        super().__init__(self._answer, **kwargs)

    def fixed(self, prompt_text: str) -> frozenset[str]:
        """The habits this prompt text suppresses."""
        text = prompt_text.casefold()
        return frozenset(h for h, phrase in self.INSTRUCTIONS.items() if phrase in text)

    def _answer(self, request: ScriptedRequest) -> str:
        active = self.habits - self.fixed(request.text)
        match = _QUESTION.search(request.text)
        if match is None:
            return "I don't know."
        a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
        if op == "+":
            value = a + b
        elif op == "-":
            value = a - b
        else:
            value = a * b
            if "sloppy" in active and abs(value) >= 100:
                value += 1
        text = _spell(value) if "spelled" in active and value % 2 == 1 else str(value)
        if "chatty" in active and (a + b) % 3 != 0:
            return f"The answer is {text}."
        return text


def arithmetic_examples(n: int, *, seed: int = 0, prefix: str = "q") -> list[Example]:
    """``n`` demo examples "What is A op B?" with their answers, ids ``{prefix}{i}``."""
    rng = random.Random(seed)
    out: list[Example] = []
    for i in range(n):
        op = rng.choice("+-*")
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(Example({"question": f"What is {a} {op} {b}?"}, str(value), id=f"{prefix}{i}"))
    return out


_SECTION = re.compile(r"^## (.+?)\n(.*?)(?=\n## |\Z)", re.DOTALL | re.MULTILINE)


def _sections(text: str) -> dict[str, str]:
    return {m.group(1).strip(): m.group(2).strip() for m in _SECTION.finditer(text)}


class ArithmeticCoach(ScriptedModel):
    """The demo task's optimizer model: answers the engine's default stage prompts.

    It reads the gradient prompt's prediction and expected output and names the habit
    that caused the failure; it reads the apply prompt's current prompt and feedback
    and returns the prompt with the matching instruction added, as JSON messages.
    """

    FIXES: Mapping[str, tuple[str, str]] = {
        "chatty": (
            "The model wrapped the number in a sentence; the metric wants the bare number. "
            "Tell it to reply with only the number.",
            "Reply with only the number.",
        ),
        "spelled": (
            "The model spelled the digits out as words. Tell it to write the answer in digits.",
            "Write the answer in digits.",
        ),
        "sloppy": (
            "The arithmetic is off by one. Tell the model to work carefully and double-check.",
            "Work carefully and double-check the arithmetic.",
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(self._answer, **kwargs)

    def _answer(self, request: ScriptedRequest) -> str:
        system = request.messages[0]["content"] if request.messages else ""
        parts = _sections(request.messages[-1]["content"])
        if system.startswith("Describe the task"):
            return "Answer an arithmetic question with the resulting number."
        if system.startswith("Describe in two sentences how this metric"):
            return "Exact match against the expected number: full marks only for the bare number."
        if "Prediction" in parts:
            return self._gradient(parts)
        if "Feedback to apply" in parts:
            return self._apply(parts)
        return "I cannot help with that."

    def _gradient(self, parts: Mapping[str, str]) -> str:
        prediction = parts.get("Prediction", "")
        if "answer is" in prediction.casefold():
            habit = "chatty"
        elif re.search(r"[a-z]", prediction.casefold()):
            habit = "spelled"
        else:
            habit = "sloppy"
        feedback = self.FIXES[habit][0]
        earlier = next((v for k, v in parts.items() if k.startswith("Earlier feedback")), "")
        if feedback in earlier:
            return "The earlier fix was not applied strongly enough. " + feedback
        return feedback

    def _apply(self, parts: Mapping[str, str]) -> str:
        messages = json.loads(parts["Current prompt"])
        feedback = parts["Feedback to apply"]
        added = [sentence for fb, sentence in self.FIXES.values() if fb in feedback]
        system = next((m for m in messages if m["role"] == "system"), None)
        if system is None:
            system = {"role": "system", "content": ""}
            messages.insert(0, system)
        for sentence in added:
            if sentence not in system["content"]:
                system["content"] = (system["content"] + " " + sentence).strip()
        return json.dumps({"messages": messages})
