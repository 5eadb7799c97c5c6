"""`Prompt`: chat messages with ``{name}`` placeholders, rendered safely and hashed.

Rendering never calls ``str.format`` on user text: each template is parsed once into
literal segments and plain field names, so ``{x.__class__}`` or ``{x[0]}`` in a template
is rejected at construction and braces inside example data are copied verbatim.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ._errors import ConfigError

__all__ = ["Message", "Prompt", "canonical_json", "normalise_numbers", "render_value"]

_FORMATTER = string.Formatter()

Message = Mapping[str, str]
"""One chat message: ``{"role": ..., "content": ...}``."""

_ROLES = frozenset({"system", "user", "assistant", "developer"})


# json.dumps with these options builds an encoder per call (0.7 of its 1.7 us on an
# example's inputs); encode() keeps no state between calls
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: the one form that is hashed."""
    return _CANONICAL.encode(value)


def normalise_numbers(value: Any) -> Any:
    """``value`` with every integral float written as an int (``0.0`` -> ``0``), recursively.

    Applied to what is sent as JSON to a provider (sampling params, response formats), so
    ``temperature = 0`` and ``temperature = 0.0`` are one request and one cache key.  Not
    applied to example inputs: those are rendered into text, where ``1`` and ``1.0`` differ.
    """
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} is not a JSON number")
        return int(value) if value.is_integer() else value
    if isinstance(value, Mapping):
        return {k: normalise_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalise_numbers(v) for v in value]
    return value


def render_value(value: Any) -> str:
    """How an input value appears in a rendered prompt: strings as-is, others as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _parse_template(text: str, where: str) -> tuple[tuple[str, str | None], ...]:
    """Split ``text`` into (literal, field-or-None) pairs; reject anything but names."""
    segments: list[tuple[str, str | None]] = []
    try:
        parsed = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise ConfigError(
            f"{where}: malformed template ({exc}); use {{{{ and }}}} for braces"
        ) from None
    for literal, field, spec, conversion in parsed:
        if field is None:
            segments.append((literal, None))
            continue
        if not field.isidentifier():
            raise ConfigError(
                f"{where}: placeholder {{{field}}} is not a plain name; attribute and index "
                "access are not allowed (write {{ and }} for literal braces)"
            )
        if spec or conversion:
            raise ConfigError(
                f"{where}: placeholder {{{field}}} may not carry !conversion or :spec"
            )
        segments.append((literal, field))
    return tuple(segments)


class Prompt:
    """An immutable prompt: chat messages, the model, sampling params, response format.

    ``Prompt.hash`` is a SHA-256 over the canonical JSON of *all* of these, so a change
    of temperature, max_tokens or response format is a different cache key.

    Usage::

        prompt = Prompt(
            [{"role": "system", "content": "Answer briefly."},
             {"role": "user", "content": "{question}"}],
            model="gpt-4o-mini", temperature=0.0,
        )
        messages = prompt.render({"question": "2+2?"})
    """

    __slots__ = (
        "_hash",
        "_messages",
        "_model",
        "_params",
        "_placeholders",
        "_response_format",
        "_segments",
    )

    def __init__(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        model: str,
        temperature: float | None = None,
        params: Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> None:
        msgs: list[Message] = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping):
                raise ConfigError(f"prompt message {i} must be a mapping with role and content")
            role, content = message.get("role"), message.get("content")
            if role not in _ROLES:
                raise ConfigError(
                    f"prompt message {i}: role must be one of {sorted(_ROLES)}, got {role!r}"
                )
            if not isinstance(content, str):
                raise ConfigError(f"prompt message {i}: content must be a string")
            msgs.append(MappingProxyType({"role": role, "content": content}))
        if not msgs:
            raise ConfigError("a prompt needs at least one message")
        if not isinstance(model, str) or not model:
            raise ConfigError("prompt model must be a non-empty string")
        merged = dict(params or {})
        if temperature is not None:
            merged["temperature"] = temperature
        for key in ("messages", "model", "response_format", "stream", "n"):
            if key in merged:
                raise ConfigError(f"prompt params may not set {key!r}")
        try:
            params_json = canonical_json(normalise_numbers(merged))
            format_json = canonical_json(normalise_numbers(response_format))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"prompt params must be JSON values: {exc}") from exc

        self._messages: tuple[Message, ...] = tuple(msgs)
        self._model = model
        self._params: Mapping[str, Any] = MappingProxyType(json.loads(params_json))
        self._response_format: Mapping[str, Any] | None = (
            MappingProxyType(json.loads(format_json)) if response_format is not None else None
        )
        self._segments = tuple(
            _parse_template(m["content"], f"prompt message {i}") for i, m in enumerate(msgs)
        )
        self._placeholders = frozenset(
            field for segs in self._segments for _, field in segs if field is not None
        )
        self._hash = hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()

    # -- values -----------------------------------------------------------------------
    @property
    def messages(self) -> tuple[Message, ...]:
        return self._messages

    @property
    def model(self) -> str:
        return self._model

    @property
    def params(self) -> Mapping[str, Any]:
        """Sampling parameters sent with every call (temperature, max_tokens, ...)."""
        return self._params

    @property
    def temperature(self) -> float | None:
        value = self._params.get("temperature")
        return float(value) if value is not None else None

    @property
    def response_format(self) -> Mapping[str, Any] | None:
        return self._response_format

    def request_params(self) -> dict[str, Any]:
        """What every request of this prompt sends besides the messages: the model, the
        sampling params and the response format (a fresh dict each call)."""
        params: dict[str, Any] = {"model": self._model, **self._params}
        if self._response_format is not None:
            params["response_format"] = dict(self._response_format)
        return params

    @property
    def placeholders(self) -> frozenset[str]:
        """The input names the messages refer to."""
        return self._placeholders

    @property
    def hash(self) -> str:
        """Canonical content hash over messages, model, params and response format."""
        return self._hash

    # -- behaviour --------------------------------------------------------------------
    def render(self, inputs: Mapping[str, Any]) -> list[dict[str, str]]:
        """Substitute ``inputs`` into the messages.

        Raises `ConfigError` when an input is missing or when ``inputs`` carries a name
        the prompt does not use (a likely typo that would silently drop data).
        """
        missing = self._placeholders.difference(inputs)
        if missing:
            raise ConfigError(f"inputs are missing placeholder(s) {sorted(missing)}")
        extra = set(inputs).difference(self._placeholders)
        if extra:
            raise ConfigError(f"inputs carry name(s) {sorted(extra)} that the prompt does not use")
        rendered_values = {name: render_value(inputs[name]) for name in self._placeholders}
        out: list[dict[str, str]] = []
        for message, segments in zip(self._messages, self._segments, strict=True):
            parts: list[str] = []
            for literal, field in segments:
                parts.append(literal)
                if field is not None:
                    parts.append(rendered_values[field])
            out.append({"role": message["role"], "content": "".join(parts)})
        return out

    def replace(
        self,
        *,
        messages: Iterable[Mapping[str, str]] | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> Prompt:
        """A new prompt with some fields changed (this one is never mutated)."""
        return Prompt(
            self._messages if messages is None else messages,
            model=self._model if model is None else model,
            params=self._params if params is None else params,
            response_format=self._response_format if response_format is None else response_format,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``Prompt.from_dict`` reverses it."""
        return {
            "messages": [dict(m) for m in self._messages],
            "model": self._model,
            "params": dict(self._params),
            "response_format": (
                dict(self._response_format) if self._response_format is not None else None
            ),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Prompt:
        if not isinstance(data, Mapping) or "messages" not in data or "model" not in data:
            raise ConfigError("a prompt needs 'messages' and 'model'")
        return cls(
            data["messages"],
            model=data["model"],
            params=data.get("params") or {},
            response_format=data.get("response_format"),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Prompt) and other._hash == self._hash

    def __hash__(self) -> int:
        return hash(self._hash)

    def __repr__(self) -> str:
        first = self._messages[0]["content"]
        preview = first if len(first) <= 40 else first[:37] + "..."
        return (
            f"Prompt(model={self._model!r}, messages={len(self._messages)}, "
            f"hash={self._hash[:12]}, {preview!r})"
        )
