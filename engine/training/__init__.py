"""The trainer: the text-gradient optimization loop, its proposals and selection policies.

`optimize` is the entry point; `TrainerSettings` is the method's settings as one value.
How a step's proposals are made and judged lives in `_proposals`, what wins (greedy or a
Pareto pool, tie-breaks) in `_selection`.
"""

from ._settings import TrainerSettings
from ._trainer import OptimizationResult, optimize, preflight_global_metric

__all__ = ["OptimizationResult", "TrainerSettings", "optimize", "preflight_global_metric"]
