"""The declared schema of a run file: one msgspec Struct per TOML section.

Every section forbids unknown keys, every key has a declared type and range, so a typo
(``[budget] max_call``) or a wrong type is an error before anything runs, never a
silently ignored setting.  `engine.cli._schema_check` turns msgspec's errors into messages
that name the file, line, section and key; `engine.cli._runfile` turns a decoded schema into
the engine's own values (`Prompt`, `Limits`, `RetryPolicy`, `Budget`, datasets).

Keys absent from the file keep the engine's defaults: a section's ``None`` means "not
given".  TOML has no null, so the retry settings that ``None`` disables (``timeout``,
``deadline``, ``circuit_breaker``, ``hedge_after``) take ``false`` for "none".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "BudgetSection",
    "CacheSection",
    "ClusterSection",
    "DataSection",
    "EndpointSection",
    "LimitsSection",
    "MetricSection",
    "OutputSection",
    "ProgramPromptSection",
    "ProgramSection",
    "PromptSection",
    "RetrySection",
    "RunFileSchema",
    "TrackingSection",
    "TrainerSection",
]

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Share = Annotated[float, msgspec.Meta(ge=0, le=1)]
FlushInterval = Annotated[float, msgspec.Meta(gt=0, le=5)]
PricePair = tuple[NonNegativeFloat, NonNegativeFloat]


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Base of every section: unknown keys are errors (msgspec inherits the config;
    ``frozen`` is repeated on each subclass for the type checker)."""


class PromptSection(_Section, frozen=True):
    """``[prompt]``: the messages (inline or a JSON file), the model and its parameters."""

    model: str
    file: str | None = None
    messages: list[dict[str, Any]] | None = None
    temperature: NonNegativeFloat | None = None
    params: dict[str, Any] = {}
    response_format: dict[str, Any] | None = None


class ProgramPromptSection(PromptSection, frozen=True):
    """``[prompts.NAME]``: one prompt of a program; ``adapter`` names the endpoint
    section it runs on (``model``, the default, or an ``[adapters.NAME]`` table)."""

    adapter: str | None = None


class ProgramSection(_Section, frozen=True):
    """``[program]``: the async pipeline (``use = "module:callable"``) calling the
    ``[prompts.NAME]``; ``calls_per_example`` bounds its calls for ``--dry-run``
    (a number, or one per prompt name; default: one call of each prompt)."""

    use: str
    calls_per_example: PositiveInt | dict[str, PositiveInt] | None = None


class DataSection(_Section, frozen=True):
    """``[data]``: dataset files (relative to the run file) and which columns are what."""

    train: str
    val: str | None = None
    inputs: list[str] | str | None = None  # a single string is one column
    expected: str = "expected"
    id: str = "id"
    metadata: list[str] = []


class MetricSection(_Section, frozen=True):
    """``[metric]``: the per-example metric, its options, the global metric, limits."""

    use: str = "engine.metrics:ExactMatch"
    options: dict[str, Any] = {}
    global_metric: str | None = msgspec.field(default=None, name="global")
    timeout: PositiveFloat = 60.0
    threads: PositiveInt | None = None


class LimitsSection(_Section, frozen=True):
    """``[<endpoint>.limits]``: maps onto `engine.Limits`."""

    rpm: PositiveFloat | None = None
    tpm: PositiveFloat | None = None
    concurrency: PositiveInt | None = None
    burst: PositiveFloat | None = None
    input_tpm: PositiveFloat | None = None  # Anthropic's ITPM
    output_tpm: PositiveFloat | None = None  # Anthropic's OTPM
    adaptive_concurrency: bool | None = None


class RetrySection(_Section, frozen=True):
    """``[<endpoint>.retry]``: maps 1:1 onto `engine.RetryPolicy` (``false`` = None)."""

    max_attempts: PositiveInt | None = None
    base_delay: NonNegativeFloat | None = None
    max_delay: NonNegativeFloat | None = None
    timeout: PositiveFloat | bool | None = None
    deadline: PositiveFloat | bool | None = None
    max_retry_after: NonNegativeFloat | None = None
    circuit_breaker: PositiveInt | bool | None = None
    # seconds or "p95" (checked by `engine.cli._runfile`, which names the line); off unless given
    hedge_after: PositiveFloat | str | bool | None = None


class EndpointSection(_Section, frozen=True):
    """``[model]``, ``[optimizer]``, ``[batch]``: an adapter and how to call it."""

    adapter: str
    options: dict[str, Any] = {}  # free-form: the adapter's own keyword arguments
    model_name: str | None = None
    api_key_env: str | None = None
    cache_namespace: str | None = None
    limits: LimitsSection | None = None
    retry: RetrySection | None = None


class TrainerSection(_Section, frozen=True):
    """``[trainer]``: the method's settings; only the keys given reach `optimize`."""

    batch_size: PositiveInt | None = None
    max_proposals_per_step: PositiveInt | None = None
    history_size: PositiveInt | None = None
    seed: int | None = None
    racing: bool | None = None
    parallel_proposals: PositiveInt | None = None
    task_description: str | None = None
    metric_description: str | None = None
    max_error_rate: Share | None = None
    selection: Literal["greedy", "pareto"] | None = None
    accept_on: Literal["train", "val"] | None = None
    tie_break: list[Literal["cost", "length"]] | None = None
    patience: PositiveInt | None = None
    merge: bool | None = None
    component: Literal["round_robin", "blame"] | None = None  # a program's step


class BudgetSection(_Section, frozen=True):
    """``[budget]``: caps, and prices in USD per million (input, output) tokens."""

    max_calls: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    max_cost: PositiveFloat | None = None
    prices: dict[str, PricePair] = {}


class CacheSection(_Section, frozen=True):
    """``[cache]``: an SQLite file (``path``) or a PostgreSQL ``url``, not both."""

    path: str | None = None
    url: str | None = None
    table: str = "engine_cache"
    flush_interval: FlushInterval | None = None


class ClusterSection(_Section, frozen=True):
    """``[cluster]``: where scale-out runs (``local``, ``auto`` or ``ray://host:port``)."""

    address: str = "local"
    workers: PositiveInt | None = None


class OutputSection(_Section, frozen=True):
    """``[output]``: the folder `optimize` writes into (relative to the run file)."""

    dir: str = "out"


class TrackingSection(_Section, frozen=True):
    """``[tracking]``: log the optimization to MLflow (``mlflow`` is a tracking URI;
    a relative ``file:`` path is relative to the run file)."""

    mlflow: str | None = None
    experiment: str | None = None
    run_name: str | None = None


class RunFileSchema(_Section, frozen=True):
    """A whole run file.  ``[data]``, ``[model]`` and either ``[prompt]`` or a
    ``[program]`` with its ``[prompts.NAME]`` tables are required."""

    data: DataSection
    model: EndpointSection
    metric: MetricSection = msgspec.field(default_factory=MetricSection)
    optimizer: EndpointSection | None = None
    batch: EndpointSection | None = None
    trainer: TrainerSection = msgspec.field(default_factory=TrainerSection)
    budget: BudgetSection | None = None
    cache: CacheSection = msgspec.field(default_factory=CacheSection)
    cluster: ClusterSection | None = None
    output: OutputSection = msgspec.field(default_factory=OutputSection)
    tracking: TrackingSection | None = None
    prompt: PromptSection | None = None
    program: ProgramSection | None = None
    prompts: dict[str, ProgramPromptSection] | None = None
    adapters: dict[str, EndpointSection] = {}
