"""What a metric *is*, for cache keys: its code and every piece of state it captured.

Two metrics share cached results only if they would score alike: same code, same
arguments.  A metric's identity covers its source, its qualified name, its compiled
code (bytecode, constants and names, nested code objects included: two ``exec``'d
functions named alike, a function redefined in a REPL, two lambdas on one line all
differ), and the state it carries: a closure's cells, a function's defaults and the
plain globals it reads, a `functools.partial`'s arguments, an instance's attributes,
and its class's attributes along the MRO (``Thresh.level = 5`` at run time is another
metric).  Bytecode differs between Python versions, so a new interpreter scores afresh.
State that has no canonical form (an open file, an object whose repr is its address)
makes the metric uncacheable: `metric_identity` returns ``None`` and the engine scores
it afresh every time rather than risk returning another metric's results (a class
attribute of that kind is recorded by its type only).  A ``cache_key`` attribute overrides all this.
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
# Class attributes that are Python's bookkeeping, not the class's state.
_SKIPPED_ATTRIBUTES = frozenset(
    {"__dict__", "__doc__", "__module__", "__qualname__", "__weakref__", "__slots__",
     "__annotations__", "__firstlineno__", "__static_attributes__", "__parameters__",
     "__orig_bases__", "__abstractmethods__", "_abc_impl", "cache_key"}
)  # fmt: skip


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
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
    if isinstance(value, type):
        return _class(value, depth)
    if isinstance(value, types.BuiltinFunctionType):
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
        _code(code),
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
        _class_attributes(kind, depth + 1),
    ]


def _class(kind: type, depth: int) -> Any:
    name = f"{kind.__module__}.{kind.__qualname__}"
    if kind.__module__ == "builtins":
        return ["name", name]
    return ["class", name, _class_attributes(kind, depth + 1)]


def _class_attributes(kind: type, depth: int) -> Any:
    """What the class itself holds, along the MRO: its functions by their code, its
    plain data by value (what has no canonical form by its type: not followed)."""
    described = []
    for klass in kind.__mro__:
        if klass.__module__ == "builtins":
            continue  # object, int, dict...: nothing a run changes
        attributes = {}
        for name, value in sorted(vars(klass).items(), key=_key):
            if name in _SKIPPED_ATTRIBUTES or name.startswith("_engine_"):
                continue
            function = _function_of(value)
            if function is not None:
                attributes[name] = _code(function.__code__)
            elif not isinstance(value, type):  # nested classes: named by the source
                attributes[name] = _describe(value, depth, strict=False)
        described.append([f"{klass.__module__}.{klass.__qualname__}", attributes])
    return described


def _function_of(value: Any) -> types.FunctionType | None:
    """The function behind a class attribute (a method, static or class method, or a
    property's getter), or ``None``."""
    if isinstance(value, staticmethod | classmethod):
        value = value.__func__
    elif isinstance(value, property):
        value = value.fget
    return value if isinstance(value, types.FunctionType) else None


def _code(code: types.CodeType) -> Any:
    """A code object in canonical form: what it does, not where it was written."""
    return [
        "code",
        code.co_code.hex(),
        [_constant(c) for c in code.co_consts],
        list(code.co_names),
        list(code.co_varnames),
        list(code.co_freevars),
        [code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags],
    ]


def _constant(value: Any) -> Any:
    """A code constant, typed (``1`` and ``1.0`` are different constants here)."""
    if isinstance(value, types.CodeType):
        return _code(value)
    if isinstance(value, tuple):
        return ["tuple", [_constant(v) for v in value]]
    if isinstance(value, frozenset):
        return ["frozenset", sorted(repr(v) for v in value)]
    return [type(value).__name__, repr(value)]


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
