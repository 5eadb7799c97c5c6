"""Programs: several named prompts in one async pipeline, evaluated and optimized
together (`evaluate(prompts, data, program=...)`, `optimize(prompts, ..., program=...)`).

A program is ``async def program(lm, example) -> answer``; ``lm(name, **variables)``
renders prompt ``name`` and sends it through the engine (endpoint, budget, cache).
"""

from ._blame import COMPONENTS, Component, blamed_stage, check_component
from ._lm import DRY_RUN_MAX_CALLS, ProgramRunner, dry_run, render_call
from ._setup import LM, Program, ProgramSetup, StageCounts, program_identity, program_setup

__all__ = [
    "COMPONENTS",
    "DRY_RUN_MAX_CALLS",
    "LM",
    "Component",
    "Program",
    "ProgramRunner",
    "ProgramSetup",
    "StageCounts",
    "blamed_stage",
    "check_component",
    "dry_run",
    "program_identity",
    "program_setup",
    "render_call",
]
