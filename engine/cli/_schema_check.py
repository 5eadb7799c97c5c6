"""Checking a parsed run file against `engine.cli._schema`, with messages a person can act on.

Three passes, each naming file, line, section and key:

1. secrets: a key that holds a credential (`engine._secrets` decides which names do) is
   refused anywhere, and so is a credential-shaped value in an endpoint section;
2. unknown keys: every one is listed at once, each with a did-you-mean suggestion
   (``[budget] unknown key max_call; did you mean max_calls?``);
3. types and ranges: msgspec converts the tables into the declared Structs; its errors
   (``Expected `int`, got `str` - at `$.trainer.batch_size```) are translated into
   ``[trainer] batch_size must be an integer, got "four"``.

Lines are found by reading the TOML text (tomllib keeps no positions); when a key
cannot be found the message names the file alone.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from .._errors import ConfigError
from .._redact import redact_text
from .._secrets import is_secret_name
from ._schema import RunFileSchema

__all__ = ["TomlSource", "decode_run_file"]

Token = str | int
_ANY_KEY = object()  # msgspec writes a failing dict key as ``[...]``
_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_PATH_TOKEN = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[(\.\.\.)\]")
_AT = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
# Subtrees whose keys are names chosen by the user, not settings: model names in prices,
# a response format's JSON schema (a field may well be called "token"), message bodies.
_FREE_KEYS: tuple[tuple[str, ...], ...] = (
    ("budget", "prices"),
    ("prompt", "response_format"),
    ("prompt", "messages"),
)
_ENDPOINTS = ("model", "optimizer", "batch")
_TYPE_WORDS = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "array": "an array",
    "object": "a table",
}


@dataclass(frozen=True)
class TomlSource:
    """A run file's path and text, to point at the line of a key."""

    path: Path
    text: str

    def where(self, tokens: Sequence[Token]) -> str:
        line = self.line_of([t for t in tokens if isinstance(t, str)])
        return f"{self.path}:{line}" if line is not None else str(self.path)

    def line_of(self, keys: Sequence[str]) -> int | None:
        """The line that sets ``keys`` (a table path), else its table's header line."""
        header: tuple[str, ...] = ()
        fallback: tuple[int, int] | None = None  # (header depth, line)
        for number, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            match = _HEADER.match(line)
            if match:
                header = tuple(p.strip().strip("\"'") for p in match.group(1).split("."))
                if tuple(keys[: len(header)]) == header and (
                    fallback is None or len(header) > fallback[0]
                ):
                    if len(header) == len(keys):
                        return number
                    fallback = (len(header), number)
                continue
            if tuple(keys[: len(header)]) != header or len(keys) <= len(header):
                continue
            if all(_sets_key(line, key) for key in keys[len(header) :][-2:]):
                return number
        return fallback[1] if fallback is not None else None


def _sets_key(line: str, key: str) -> bool:
    return re.search(rf"(^|[\s{{,.\"']){re.escape(key)}[\"']?\s*[=.]", line) is not None


def _display(tokens: Sequence[Token]) -> str:
    """``("budget", "prices", "demo")`` -> ``[budget] prices.demo``."""
    sections, rest = _split_section(tokens)
    key = "".join(f"[{t}]" if isinstance(t, int) else f".{t}" for t in rest).lstrip(".")
    head = f"[{'.'.join(sections)}]" if sections else "the top level"
    return f"{head} {key}".rstrip()


def _split_section(tokens: Sequence[Token]) -> tuple[list[str], list[Token]]:
    """Leading tokens that name Struct sections, and the key path inside the last one."""
    sections: list[str] = []
    current: Any = RunFileSchema
    for index, token in enumerate(tokens):
        child = _child_type(current, token)
        if isinstance(token, str) and _struct_in(child) is not None:
            sections.append(token)
            current = _struct_in(child)
            continue
        return sections, list(tokens[index:])
    return sections, []


# -- type walking ---------------------------------------------------------------------
def _members(tp: Any) -> list[Any]:
    """``tp`` without ``Annotated``, split into its union members."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(tp) for m in _members(arg)]
    return [tp]


def _struct_in(tp: Any) -> type[msgspec.Struct] | None:
    for member in _members(tp):
        if isinstance(member, type) and issubclass(member, msgspec.Struct):
            return member
    return None


@functools.cache
def _fields(struct: type[msgspec.Struct]) -> dict[str, Any]:
    # cached: msgspec resolves the annotations on every call, and the schema is fixed
    return {f.encode_name: f.type for f in msgspec.structs.fields(struct)}


def _child_type(tp: Any, token: Token | object) -> Any:
    """The declared type one step below ``tp``, or ``None`` when nothing is declared."""
    for member in _members(tp):
        origin, args = typing.get_origin(member), typing.get_args(member)
        if isinstance(member, type) and issubclass(member, msgspec.Struct):
            if isinstance(token, str) and token in _fields(member):
                return _fields(member)[token]
        elif origin is dict and not isinstance(token, int):
            return args[1]
        elif origin is list and isinstance(token, int):
            return args[0]
        elif origin is tuple and isinstance(token, int) and token < len(args):
            return args[token]
    return None


# -- pass 1: secrets ------------------------------------------------------------------
def _walk(value: Any, tokens: tuple[Token, ...]) -> Iterator[tuple[tuple[Token, ...], Any]]:
    """Every (path, value) below ``value``, skipping the user-named subtrees."""
    if any(tokens[: len(free)] == free for free in _FREE_KEYS):
        return
    items: Any = (
        value.items()
        if isinstance(value, Mapping)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        path = (*tokens, key)
        yield path, child
        yield from _walk(child, path)


def _refuse_secrets(data: Mapping[str, Any], source: TomlSource) -> None:
    for path, value in _walk(data, ()):
        name = path[-1]
        if isinstance(name, str) and is_secret_name(name):
            reason = "holds a secret"
        elif (path[0] in _ENDPOINTS or path[:2] == ("metric", "options")) and _credential_shaped(
            value
        ):
            reason = "holds a value shaped like a credential"
        else:
            continue
        raise ConfigError(
            f"{source.where(path)}: {_display(path)} {reason}; run files never hold secrets: "
            "keep the key in an environment variable and name it with "
            "api_key_env = 'NAME_OF_VARIABLE' in the endpoint's section"
        )


def _credential_shaped(value: Any) -> bool:
    return isinstance(value, str) and redact_text(value) != value


# -- pass 2: unknown keys -------------------------------------------------------------
def _unknown_keys(
    data: Mapping[str, Any], struct: type[msgspec.Struct], tokens: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, suggestion) for every key that ``struct`` does not declare, recursively."""
    fields = _fields(struct)
    for key, value in data.items():
        path = (*tokens, key)
        if key not in fields:
            yield path, _suggest(key, struct, tokens)
            continue
        nested = _struct_in(fields[key])
        if nested is not None and isinstance(value, Mapping):
            yield from _unknown_keys(value, nested, path)


def _subtree(struct: type[msgspec.Struct], tokens: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    for name, tp in _fields(struct).items():
        yield (*tokens, name)
        nested = _struct_in(tp)
        if nested is not None:
            yield from _subtree(nested, (*tokens, name))


def _suggest(key: str, struct: type[msgspec.Struct], tokens: tuple[str, ...]) -> str:
    """A did-you-mean: a close name here, else the same or a close name deeper or
    elsewhere in the schema (``[model] rpm`` -> ``[model.limits] rpm``)."""
    names = list(_fields(struct))
    here = (
        difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        or [
            n
            for n in names
            if min(len(n), len(key)) >= 3 and (n.startswith(key) or key.startswith(n))
        ][:1]
    )  # a name cut short or written out: ``dir`` for ``directory``
    if here:
        return f"[{here[0]}]" if not tokens else here[0]
    for scope in (list(_subtree(struct, tokens)), list(_subtree(RunFileSchema, ()))):
        names = [p[-1] for p in scope]
        close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
        if close:
            path = next(p for p in scope if p[-1] == close[0])
            return _display(path) if len(path) > 1 else f"[{path[0]}]"
    return ""


def _refuse_unknown(data: Mapping[str, Any], source: TomlSource) -> None:
    lines = []
    for path, suggestion in _unknown_keys(data, RunFileSchema, ()):
        what = f"unknown section [{path[0]}]" if len(path) == 1 else _unknown_text(path)
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        lines.append(f"{source.where(path)}: {what}{hint}")
    if lines:
        raise ConfigError("\n".join(lines))


def _unknown_text(path: tuple[str, ...]) -> str:
    sections, rest = _split_section(path[:-1])
    head = f"[{'.'.join(sections)}]"
    inner = ".".join(str(t) for t in rest)
    return f"{head} unknown key {inner + '.' if inner else ''}{path[-1]}"


# -- pass 3: types and ranges ---------------------------------------------------------
def _parse_path(text: str, data: Any) -> list[Token]:
    """msgspec's ``.budget.prices[...][1]`` as tokens, ``[...]`` resolved in ``data``."""
    tokens: list[Token] = []
    declared: Any = RunFileSchema
    for name, index, _ in _PATH_TOKEN.findall(text):
        token: Token | object = name or (int(index) if index else _ANY_KEY)
        if token is _ANY_KEY:
            token = _failing_key(data, _child_type(declared, ""))
        assert isinstance(token, str | int)
        tokens.append(token)
        declared = _child_type(declared, token)
        data = _step(data, token)
    return tokens


def _step(data: Any, token: Token) -> Any:
    if isinstance(data, Mapping):
        return data.get(token)
    if isinstance(data, list) and isinstance(token, int) and token < len(data):
        return data[token]
    return None


def _failing_key(container: Any, value_type: Any) -> str:
    """The first key of a table whose value does not convert to ``value_type``."""
    for key, value in (container or {}).items():
        try:
            msgspec.convert(value, value_type, strict=True)
        except msgspec.ValidationError:
            return str(key)
    return "?"


def _expected(text: str) -> str:
    """``Expected `int | null` >= 1`` -> ``an integer >= 1``."""
    match = re.match(r"Expected `([^`]*)`(.*?)(?:, got .*)?$", text)
    if match is None:
        return text
    names = [n for n in match.group(1).split(" | ") if n != "null"]
    # a bool beside a number stands for ``false`` ("none"), see `engine.cli._schema`
    words = ["false" if n == "bool" and len(names) > 1 else _TYPE_WORDS.get(n, n) for n in names]
    return " or ".join(words) + match.group(2)


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_error(exc: msgspec.ValidationError, data: Any, source: TomlSource) -> ConfigError:
    match = _AT.match(str(exc))
    assert match is not None  # the pattern matches any text
    text, tokens = match.group("text"), _parse_path(match.group("path") or "", data)
    missing = re.match(r"Object missing required field `([^`]+)`", text)
    if missing:
        path = [*tokens, missing.group(1)]
        what = f"[{path[0]}] section" if len(path) == 1 else _display(path)
        return ConfigError(f"{source.where(tokens)}: {what} is required")
    unknown = re.match(r"Object contains unknown field `([^`]+)`", text)
    if unknown:  # pass 2 reports these first; kept for safety
        path = [*tokens, unknown.group(1)]
        return ConfigError(f"{source.where(path)}: {_display(path)} is not a known key")
    value = _step_all(data, tokens)
    return ConfigError(
        f"{source.where(tokens)}: {_display(tokens)} must be {_expected(text)}, got {_shown(value)}"
    )


def _step_all(data: Any, tokens: Sequence[Token]) -> Any:
    for token in tokens:
        data = _step(data, token)
    return data


def decode_run_file(data: Mapping[str, Any], source: TomlSource) -> RunFileSchema:
    """Check ``data`` (parsed TOML) against the schema; raise `ConfigError` naming the
    place of the first problem (every unknown key at once)."""
    _refuse_secrets(data, source)
    _refuse_unknown(data, source)
    try:
        return msgspec.convert(data, RunFileSchema, strict=True)
    except msgspec.ValidationError as exc:
        raise _type_error(exc, data, source) from None
