"""A program's checked arguments: its callable, its named prompts, the endpoint of each,
its identity, and the per-prompt counters a run shares across its evaluations."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._errors import ConfigError
from .._prompt import Prompt, canonical_json
from .._protocols import ChatModel
from .._types import Example
from ..cache import metric_identity
from ..endpoint import Endpoint, Limits

__all__ = ["LM", "Program", "ProgramSetup", "StageCounts", "program_identity", "program_setup"]

LM = Callable[..., Awaitable[str]]
"""``await lm(name, **variables) -> str``: render prompt ``name`` and send it."""

Program = Callable[[LM, Example], Awaitable[Any]]
"""``async def program(lm, example) -> answer``: any async code calling ``lm``."""

Models = ChatModel | Endpoint | Mapping[str, ChatModel | Endpoint]


class StageCounts:
    """Paid calls and cache hits per prompt name, over every evaluation of a run."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.cache_hits: dict[str, int] = {}

    def add(self, name: str, *, cached: bool) -> None:
        counter = self.cache_hits if cached else self.calls
        counter[name] = counter.get(name, 0) + 1

    def to_dict(self) -> dict[str, dict[str, int]]:
        names = sorted(set(self.calls) | set(self.cache_hits))
        return {
            n: {"calls": self.calls.get(n, 0), "cache_hits": self.cache_hits.get(n, 0)}
            for n in names
        }


@dataclass(frozen=True, kw_only=True, slots=True)
class ProgramSetup:
    """What `evaluate` needs of a program, checked once."""

    program: Program
    prompts: Mapping[str, Prompt]
    endpoints: Mapping[str, Endpoint]
    identity: str  # the identity of the program's final predictions
    counts: StageCounts = field(default_factory=StageCounts)

    @property
    def first(self) -> Endpoint:
        """The endpoint of the first prompt (it names the run, sizes its workers)."""
        return next(iter(self.endpoints.values()))

    def with_prompts(self, prompts: Mapping[str, Prompt]) -> ProgramSetup:
        """The same program over other versions of its prompts (same names)."""
        return program_setup(prompts, self.program, self.endpoints, counts=self.counts)


def program_identity(
    program: Program, prompts: Mapping[str, Prompt], endpoints: Mapping[str, Endpoint]
) -> str:
    """What the program's final predictions depend on: its code and captured state (as a
    metric's identity), every prompt's hash and the identity of the endpoint it runs on."""
    code = metric_identity(program)
    if code is None:  # state with no canonical form: still a label, never a cache key
        code = "uncacheable:" + getattr(program, "__qualname__", type(program).__qualname__)
    parts = [code, [[n, prompts[n].hash, endpoints[n].cache_identity] for n in sorted(prompts)]]
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


def program_setup(
    prompts: Mapping[str, Prompt],
    program: Program,
    model: Models,
    *,
    limits: Limits | None = None,
    counts: StageCounts | None = None,
) -> ProgramSetup:
    """Check a program's prompts and models; `ConfigError` names what is wrong."""
    if not callable(program):
        raise ConfigError(f"program must be an async callable, got {type(program).__name__}")
    if not isinstance(prompts, Mapping) or not prompts:
        raise ConfigError("a program needs a non-empty mapping of prompt name -> Prompt")
    for name, prompt in prompts.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"prompt names must be non-empty strings, got {name!r}")
        if not isinstance(prompt, Prompt):
            raise ConfigError(f"prompt {name!r} is a {type(prompt).__name__}, not a Prompt")
    endpoints = {name: Endpoint.of(m, limits=limits) for name, m in _models(prompts, model)}
    return ProgramSetup(
        program=program,
        prompts=dict(prompts),
        endpoints=endpoints,
        identity=program_identity(program, prompts, endpoints),
        counts=counts if counts is not None else StageCounts(),
    )


def _models(prompts: Mapping[str, Prompt], model: Models) -> list[tuple[str, Any]]:
    if not isinstance(model, Mapping):
        return [(name, model) for name in prompts]
    missing, extra = set(prompts) - set(model), set(model) - set(prompts)
    if missing or extra:
        raise ConfigError(
            "model= as a mapping must name every prompt and nothing else: "
            f"missing {sorted(missing)}, unknown {sorted(extra)}"
        )
    return [(name, model[name]) for name in prompts]
