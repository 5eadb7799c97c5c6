"""Which prompt of a program a step updates: in turn (round robin), or the one the
gradient stage blames (each gradient's first line ``STAGE: <name>``; the most named)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Literal

from .._errors import ConfigError

__all__ = ["COMPONENTS", "Component", "blamed_stage", "check_component"]

Component = Literal["round_robin", "blame"]
COMPONENTS = ("round_robin", "blame")
_MARK = "STAGE:"  # as `engine.stages.BLAME_LINE` asks the default gradient to write


def check_component(component: str) -> Component:
    if component not in COMPONENTS:
        raise ConfigError(f"component must be one of {list(COMPONENTS)}, got {component!r}")
    return component  # type: ignore[return-value]


def blamed_stage(
    gradients: Sequence[tuple[str, str]], names: Sequence[str]
) -> tuple[str | None, list[tuple[str, str]]]:
    """The prompt named by most gradients (ties: the first in ``names``; ``None`` when
    none names a known prompt) and the gradients with their blame line taken out."""
    votes: Counter[str] = Counter()
    cleaned: list[tuple[str, str]] = []
    for example_id, text in gradients:
        first, _, rest = text.partition("\n")
        if first.strip().upper().startswith(_MARK):
            name = first.strip()[len(_MARK) :].strip().strip("`'\"")
            if name in names:
                votes[name] += 1
            text = rest.strip() or text
        cleaned.append((example_id, text))
    if not votes:
        return None, cleaned
    top = max(votes.values())
    return next(n for n in names if votes[n] == top), cleaned
