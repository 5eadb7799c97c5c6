"""The demo task on the scripted provider (`engine.testing.ScriptedModel`).

`ArithmeticModel` is the demo task's model: it really computes the answer to
"What is 17 + 25?", but keeps bad habits (chatty answers, digits spelled out, a sloppy
multiplication) unless the prompt's text tells it not to, so a better prompt really
scores better.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from engine import Example
from engine.testing import ScriptedModel, ScriptedRequest

__all__ = ["ArithmeticCoach", "ArithmeticModel", "arithmetic_examples"]


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
