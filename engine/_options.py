"""What `evaluate` was asked, as one value: built and checked once at the entry, then
passed whole to the local run, a cluster and its workers (no keyword list relayed).

`EvaluationBackend` is what ``evaluate(..., cluster=...)`` needs of a scale-out backend
(`engine.cluster.RayCluster` is one): the core hands it the options and never imports
the cluster.  It lives here, not in `_protocols`, because it names `EvaluationOptions`,
which itself names the protocols of `_protocols` (one module each way would be a cycle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from ._budget import BudgetMeter
from ._errors import ConfigError
from ._events import Emitter, EventCallback
from ._outcome import Evaluation, GlobalMetric, Outcome
from ._prompt import Prompt
from ._protocols import ChatModel, Metric
from ._types import Example
from .cache import Cache
from .endpoint import Endpoint, Limits
from .program import ProgramSetup

__all__ = ["ErrorPolicy", "EvaluationBackend", "EvaluationOptions", "OutcomeCallback"]

ErrorPolicy = Literal["record", "raise"]
OutcomeCallback = Callable[[Outcome], Awaitable[None] | None]


@dataclass(frozen=True, kw_only=True, slots=True)
class EvaluationOptions:
    """Every keyword of `evaluate` but the cluster (see its docstring for each)."""

    model: ChatModel | Endpoint
    metric: Metric
    cache: Cache | None = None
    limits: Limits | None = None
    on_error: ErrorPolicy = "record"
    must_beat: float | None = None
    on_event: EventCallback | None = None
    on_outcome: OutcomeCallback | None = None
    global_metric: GlobalMetric | None = None
    keep_outcomes: bool = True
    concurrency: int | None = None
    metric_concurrency: int | None = None
    metric_timeout: float | None = 60.0
    metric_threads: int = 16
    progress_interval: float = 0.5
    events: Emitter | None = None
    meter: BudgetMeter | None = None
    validate: bool = True
    # a program's checked setup (its prompts, the endpoint of each): with it, the
    # evaluated prompt and ``model`` are its first prompt and endpoint
    program: ProgramSetup | None = None

    def __post_init__(self) -> None:
        # the one place the policy is checked, whichever backend runs the evaluation
        if self.on_error not in ("record", "raise"):
            raise ConfigError(f"on_error must be 'record' or 'raise', got {self.on_error!r}")

    def emitter(self, prompt: Prompt) -> Emitter:
        """The events of an evaluation of ``prompt``: the caller's emitter or a new one
        around ``on_event``, bound to the prompt's hash."""
        return (self.events or Emitter(self.on_event)).bind(prompt=prompt.hash[:12])


class EvaluationBackend(Protocol):
    """Runs an evaluation elsewhere (a cluster's workers) with the same result."""

    async def run_evaluation(
        self, prompt: Prompt, examples: Iterable[Example], options: EvaluationOptions
    ) -> Evaluation:
        """`evaluate(prompt, examples, **options)` on this backend."""
        ...
