"""Immutable values passed between the engine's stages."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._errors import ConfigError, MetricError
from ._prompt import canonical_json
from ._redact import redact_text
from ._usage import Usage

__all__ = [
    "Completion",
    "ErrorInfo",
    "Example",
    "MetricResult",
    "ProgramCall",
    "RateLimitSnapshot",
    "Usage",
    "as_score",
    "inputs_hash",
]


def inputs_hash(inputs: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of an example's inputs."""
    return hashlib.sha256(canonical_json(dict(inputs)).encode()).hexdigest()


_json_str = json.encoder.encode_basestring  # what json.dumps(str, ensure_ascii=False) runs


def _content_hash(example: Example) -> str | None:
    """SHA-256 of everything a metric may read of an example (inputs, expected,
    metadata), or ``None`` when some of it is not a JSON value."""
    expected = example.expected
    try:
        if type(expected) is str and not example.metadata:
            # the usual row, written as canonical_json would write it (byte for byte)
            # without its general encoder: a per-example cost of cached metric results
            text = f'["{example.inputs_hash}",{_json_str(expected)},{{}}]'
        else:
            text = canonical_json([example.inputs_hash, expected, dict(example.metadata)])
        return hashlib.sha256(text.encode()).hexdigest()
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Example:
    """One dataset row: the prompt's ``inputs``, the ``expected`` answer, a stable ``id``.

    When ``id`` is not given it is a content hash of the inputs, so the same inputs
    always map to the same cache entries.  ``content_hash`` covers inputs, expected and
    metadata: metric results are cached by it, so fixing a label is never a stale hit.
    """

    inputs: Mapping[str, Any]
    expected: Any = None
    id: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    inputs_hash: str = field(default="", compare=False, repr=False)
    # computed on first use (only cached metric results need it)
    _content: list[str | None] = field(default_factory=list, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Mapping):
            raise ConfigError(f"example inputs must be a mapping, got {type(self.inputs).__name__}")
        for key in self.inputs:
            if not isinstance(key, str):
                raise ConfigError(f"example input names must be strings, got {key!r}")
        try:
            digest = inputs_hash(self.inputs)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"example inputs must be JSON values: {exc}") from exc
        object.__setattr__(self, "inputs", MappingProxyType(dict(self.inputs)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(self, "inputs_hash", digest)
        if self.id is None or self.id == "":
            object.__setattr__(self, "id", digest[:24])
        elif not isinstance(self.id, str):
            object.__setattr__(self, "id", str(self.id))

    @property
    def content_hash(self) -> str | None:
        """SHA-256 of everything a metric may read (inputs, expected, metadata), or
        ``None`` when some of it is not a JSON value (its results are then not cached)."""
        if not self._content:
            self._content.append(_content_hash(self))
        return self._content[0]


@dataclass(frozen=True, slots=True)
class RateLimitSnapshot:
    """What a provider said about its limits in one response's headers.

    ``reset_*`` are seconds until the limit is *fully* restored (OpenAI's meaning),
    not until the next call is allowed.  ``*_input_tokens`` and ``*_output_tokens`` are
    for providers that limit prompt and completion tokens apart (Anthropic's ITPM and
    OTPM).
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    limit_input_tokens: int | None = None
    remaining_input_tokens: int | None = None
    reset_input_tokens: float | None = None
    limit_output_tokens: int | None = None
    remaining_output_tokens: int | None = None
    reset_output_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Completion:
    """A model's answer to one chat call.

    ``sent_response_format`` is the response format the adapter really sent, when it
    differs from the one requested (a fallback from ``json_schema``); cache keys use it.
    """

    text: str
    usage: Usage = field(default_factory=Usage)
    model: str | None = None
    finish_reason: str | None = None
    rate_limits: RateLimitSnapshot | None = None
    sent_response_format: Mapping[str, Any] | None = None


def as_score(value: object) -> float | None:
    """A metric's plain number as a float, or ``None`` when ``value`` is not one.

    Python's bool, int and float, and scalars of array libraries (NumPy's ``bool_``,
    ``int64``, ``float32``; a 0-d array), which are not Python numbers: anything with
    ``shape == ()`` whose ``item()`` is one.  Range and NaN are checked by the caller.
    """
    if isinstance(value, bool | int | float):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        inner = item()
        if isinstance(inner, bool | int | float):
            return float(inner)
    return None


@dataclass(frozen=True, slots=True)
class MetricResult:
    """A per-example metric result: ``score`` in [0, 1], optional feedback and trace."""

    score: float
    feedback: str | None = None
    trace: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        score = as_score(self.score)
        if score is None or math.isnan(score) or not 0.0 <= score <= 1.0:
            raise MetricError(f"a metric score must be a number in [0, 1], got {self.score!r}")
        object.__setattr__(self, "score", score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "feedback": self.feedback,
            "trace": dict(self.trace) if self.trace is not None else None,
        }


@dataclass(frozen=True, slots=True)
class ProgramCall:
    """One ``lm`` call of a program on one example: the prompt's name, the variables it
    was rendered with (as sent), its output, or the error it ended with.  ``cached``:
    nothing was paid for it."""

    prompt: str
    variables: Mapping[str, str]
    output: str | None
    error: str | None = None
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "variables": dict(self.variables),
            "output": self.output,
            "error": self.error,
            "cached": self.cached,
        }


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why an example has no score: the stage, the error class, its message, attempts."""

    stage: str
    type: str
    message: str
    attempts: int = 1

    @classmethod
    def from_exception(cls, stage: str, exc: BaseException, attempts: int = 1) -> ErrorInfo:
        return cls(
            stage=stage, type=type(exc).__name__, message=redact_text(str(exc)), attempts=attempts
        )
