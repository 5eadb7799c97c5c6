"""Implementations of the engine's protocols: providers and stores.

``adapters`` imports ``engine``; ``engine`` never imports ``adapters`` (a test enforces
it).  Run files name adapters as ``"module:Class"`` strings resolved at run time.
"""

from __future__ import annotations

from .scripted import (
    ArithmeticCoach,
    ArithmeticModel,
    ScriptedModel,
    ScriptedRequest,
    arithmetic_examples,
    transient_faults,
)

__all__ = [
    "ArithmeticCoach",
    "ArithmeticModel",
    "ScriptedModel",
    "ScriptedRequest",
    "arithmetic_examples",
    "transient_faults",
]
