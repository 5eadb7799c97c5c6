"""What a metric *is*, for cache keys: its code and every piece of state it captured.

Two metrics share cached results only if they would score alike: same code, same
arguments.  A metric's identity covers its source, its qualified name, and the state it
carries: a closure's cells, a function's defaults and the plain globals it reads, a
`functools.partial`'s arguments, an instance's attributes.  State that has no canonical
form (an open file, an object whose repr is its address) makes the metric uncacheable:
`metric_identity` returns ``None`` and the engine scores it afresh every time rather than
risk returning another metric's results.  A ``cache_key`` attribute overrides all this.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import types
from collections.abc import Callable, Mapping
from typing import Any

from .._prompt import canonical_json, normalise_numbers

__all__ = ["metric_identity"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_MAX_DEPTH = 4  # how far nested callables are followed


class _NoIdentity(Exception):
    """Raised inside the walk when some captured state has no canonical form."""


def metric_identity(metric: Callable[..., Any]) -> str | None:
    """A stable hash of ``metric``'s code and captured state, or ``None`` when some of
    that state cannot be written down canonically (then its results are not cached)."""
    explicit = getattr(metric, "cache_key", None)
    if isinstance(explicit, str) and explicit:
        description: Any = ["key", explicit]
    else:
        try:
            description = _describe(metric, 0, strict=True)
        except _NoIdentity:
            return None
    try:  # threshold=1 and threshold=1.0 score alike
        text = canonical_json(normalise_numbers(description))
    except ValueError:  # NaN or infinity in the state
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(value: Any, depth: int, *, strict: bool) -> Any:
    try:
        return _walk(value, depth)
    except _NoIdentity:
        if strict:
            raise
        return ["opaque", f"{type(value).__module__}.{type(value).__qualname__}"]


def _walk(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _NoIdentity
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_walk(v, depth) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _walk(v, depth) for k, v in sorted(value.items(), key=_key)}
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__]
    if isinstance(value, functools.partial):
        return [
            "partial",
            _walk(value.func, depth + 1),
            _walk(list(value.args), depth + 1),
            _walk(value.keywords, depth + 1),
        ]
    if isinstance(value, types.MethodType):
        method: Any = value.__func__
        return ["method", _walk(method, depth + 1), _walk(value.__self__, depth + 1)]
    if isinstance(value, types.FunctionType):
        return _function(value, depth)
    if isinstance(value, type | types.BuiltinFunctionType):
        return ["name", f"{value.__module__}.{value.__qualname__}"]
    if callable(value) or hasattr(value, "__dict__") or hasattr(type(value), "__slots__"):
        return _instance(value, depth)
    return _plain(value)


def _function(fn: types.FunctionType, depth: int) -> Any:
    code = fn.__code__
    cells = [cell.cell_contents for cell in fn.__closure__ or ()]
    reads = {
        name: fn.__globals__[name] for name in sorted(_global_names(code)) if name in fn.__globals__
    }
    return [
        "function",
        f"{fn.__module__}.{fn.__qualname__}",
        _source(fn),
        _walk(cells, depth + 1),
        _walk(list(fn.__defaults__ or ()), depth + 1),
        _walk(dict(fn.__kwdefaults__ or {}), depth + 1),
        {name: _describe(v, depth + 1, strict=False) for name, v in reads.items()},
    ]


def _instance(obj: Any, depth: int) -> Any:
    kind = type(obj)
    state: dict[str, Any] = dict(getattr(obj, "__dict__", {}))
    for slot in getattr(kind, "__slots__", ()):
        if isinstance(slot, str) and hasattr(obj, slot):
            state[slot] = getattr(obj, slot)
    state = {k: v for k, v in state.items() if not k.startswith("_engine_")}
    return [
        "instance",
        f"{kind.__module__}.{kind.__qualname__}",
        _source(kind),
        _walk(state, depth + 1),
    ]


def _plain(value: Any) -> Any:
    """A value with no structure we know: JSON if it is, else an address-free repr."""
    try:
        canonical_json(value)
        return value
    except (TypeError, ValueError):
        text = repr(value)
        if _ADDRESS.search(text) or text.startswith("<"):
            raise _NoIdentity from None
        return ["repr", f"{type(value).__qualname__}", text]


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):  # nested functions and comprehensions
            names |= _global_names(const)
    return names


def _source(target: Any) -> str:
    try:
        return inspect.getsource(target)
    except (OSError, TypeError):
        return ""


def _key(item: tuple[Any, Any]) -> str:
    return str(item[0])
