"""Built-in metrics: per-example scorers and global aggregates.

A per-example metric is any callable ``(example, prediction) -> MetricResult | float``,
sync or async.  The ones here give feedback text on failures, which the gradient stage
reads.  Give a metric a ``cache_key`` attribute to pin its cache identity, and
``inline = True`` when it is cheap enough to run on the event loop (the string metrics
here are; anything slower belongs in a worker thread, the default for sync metrics).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._aggregate import mean  # the default global metric lives with the aggregation
from ._errors import ProviderError
from ._parsing import parse_json_object
from ._prompt import render_value
from ._protocols import ChatModel
from ._types import Example, MetricResult
from .endpoint import Endpoint

__all__ = ["Contains", "ExactMatch", "JSONFields", "LLMJudge", "Numeric", "mean"]


def _norm(text: str, *, case_sensitive: bool) -> str:
    text = " ".join(text.strip().split())
    return text if case_sensitive else text.casefold()


class ExactMatch:
    """1.0 when the prediction equals ``example.expected`` (whitespace-normalized)."""

    inline = True  # microseconds: a thread hop would cost more

    def __init__(self, *, case_sensitive: bool = False, strip_chars: str = "") -> None:
        self.case_sensitive = case_sensitive
        self.strip_chars = strip_chars
        self.cache_key = f"ExactMatch(case_sensitive={case_sensitive},strip={strip_chars!r})"

    def __call__(self, example: Example, prediction: str) -> MetricResult:
        expected = render_value(example.expected)
        got = _norm(prediction.strip(self.strip_chars), case_sensitive=self.case_sensitive)
        want = _norm(expected.strip(self.strip_chars), case_sensitive=self.case_sensitive)
        if got == want:
            return MetricResult(1.0)
        return MetricResult(0.0, feedback=f"expected exactly {expected!r}, got {prediction!r}")


class Contains:
    """1.0 when the expected text appears in the prediction."""

    inline = True  # microseconds: a thread hop would cost more

    def __init__(self, *, case_sensitive: bool = False) -> None:
        self.case_sensitive = case_sensitive
        self.cache_key = f"Contains(case_sensitive={case_sensitive})"

    def __call__(self, example: Example, prediction: str) -> MetricResult:
        want = _norm(render_value(example.expected), case_sensitive=self.case_sensitive)
        if want in _norm(prediction, case_sensitive=self.case_sensitive):
            return MetricResult(1.0)
        return MetricResult(0.0, feedback=f"the answer should contain {want!r}")


_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")


class Numeric:
    """1.0 when the *only* number in the prediction is within ``tolerance`` of expected.

    A prediction with several numbers, or none, scores 0 with feedback saying so.
    """

    inline = True  # microseconds: a thread hop would cost more

    def __init__(self, *, tolerance: float = 1e-6, relative: bool = False) -> None:
        self.tolerance = tolerance
        self.relative = relative
        self.cache_key = f"Numeric(tolerance={tolerance},relative={relative})"

    def __call__(self, example: Example, prediction: str) -> MetricResult:
        expected = float(example.expected)
        found = [float(m.replace(",", "")) for m in _NUMBER.findall(prediction)]
        if not found:
            return MetricResult(0.0, feedback=f"no number in the answer; expected {expected:g}")
        if len(found) > 1:
            return MetricResult(
                0.0, feedback=f"the answer holds {len(found)} numbers; give only the final one"
            )
        allowed = self.tolerance * (abs(expected) if self.relative else 1.0)
        if abs(found[0] - expected) <= allowed:
            return MetricResult(1.0)
        return MetricResult(0.0, feedback=f"got {found[0]:g}, expected {expected:g}")


class JSONFields:
    """Fraction of the expected JSON object's fields that the prediction matches."""

    inline = True  # microseconds: a thread hop would cost more

    def __init__(self, *, fields: Sequence[str] | None = None) -> None:
        self.fields = tuple(fields) if fields is not None else None
        self.cache_key = f"JSONFields(fields={self.fields})"

    def __call__(self, example: Example, prediction: str) -> MetricResult:
        expected = example.expected
        if isinstance(expected, str):
            expected = json.loads(expected)
        if not isinstance(expected, Mapping):
            raise TypeError("JSONFields needs expected values that are JSON objects")
        fields = self.fields or tuple(expected)
        parsed = parse_json_object(prediction)
        if parsed is None:
            return MetricResult(0.0, feedback="the answer is not a JSON object")
        wrong = [f for f in fields if parsed.get(f) != expected.get(f)]
        score = 1.0 - len(wrong) / len(fields) if fields else 1.0
        feedback = f"wrong or missing fields: {', '.join(wrong)}" if wrong else None
        return MetricResult(score, feedback=feedback, trace={"wrong": wrong})


_JUDGE_SYSTEM = (
    "You grade an answer against a reference. Reply with a JSON object "
    '{"score": <number from 0 to 1>, "feedback": "<one sentence on what is wrong>"}.'
)


class LLMJudge:
    """An LLM-as-judge metric on its own endpoint (so a slow judge has its own limits).

    ``preflight = False``: the engine does not spend a judge call to check it.
    """

    preflight = False

    def __init__(
        self,
        model: ChatModel | Endpoint,
        *,
        model_name: str,
        rubric: str = "Is the answer correct and complete?",
        temperature: float = 0.0,
    ) -> None:
        self.endpoint = Endpoint.of(model)
        self.model_name = model_name
        self.rubric = rubric
        self.temperature = temperature
        self.cache_key = (
            f"LLMJudge({self.endpoint.cache_identity},{model_name},{temperature},{rubric})"
        )

    async def __call__(self, example: Example, prediction: str) -> MetricResult:
        messages = [
            {"role": "system", "content": _JUDGE_SYSTEM},
            {
                "role": "user",
                "content": (
                    f"Rubric: {self.rubric}\nInputs: {render_value(dict(example.inputs))}\n"
                    f"Reference: {render_value(example.expected)}\nAnswer: {prediction}"
                ),
            },
        ]
        params: dict[str, Any] = {"model": self.model_name, "temperature": self.temperature}
        result = await self.endpoint.complete(messages, params)
        parsed = parse_json_object(result.completion.text)
        if parsed is None or not isinstance(parsed.get("score"), int | float):
            raise ProviderError(
                f"judge reply is not a JSON score: {result.completion.text[:200]!r}",
                endpoint=self.endpoint.name,
            )
        score = min(1.0, max(0.0, float(parsed["score"])))
        feedback = parsed.get("feedback")
        return MetricResult(score, feedback=str(feedback) if feedback else None)
