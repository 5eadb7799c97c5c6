"""textgrad-engine: an asynchronous engine for text-gradient prompt optimization.

Public API::

    from engine import Prompt, Example, Limits, evaluate, Cache, metrics

Everything listed in ``__all__`` is supported; modules starting with ``_`` are not.
"""

from __future__ import annotations

from . import metrics
from ._budget import DEFAULT_PRICES, Budget, BudgetMeter, Price
from ._cache import Cache, CachedPrediction, CacheStatistics, metric_identity
from ._cache_copy import copy_cache
from ._endpoint import CallResult, Endpoint, EndpointStatistics
from ._errors import (
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CacheConflictError,
    CacheError,
    CallTimeoutError,
    ConfigError,
    ConnectionFailedError,
    DataError,
    EndpointUnreachableError,
    EngineError,
    MetricError,
    NoContentError,
    PermanentError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    TransientError,
)
from ._evaluate import Evaluation, GlobalMetric, Outcome, evaluate, validate_examples
from ._events import Emitter, Event, EventCallback
from ._limits import LimiterStatistics, Limits, RateLimiter
from ._parsing import parse_json_object
from ._postgres import PostgresStore
from ._prompt import Prompt
from ._protocols import CacheStore, ChatModel, Metric
from ._redact import redact_event, redact_text
from ._report import ProposalRecord, RunReport, StepRecord
from ._retry import RetryPolicy
from ._stages import (
    ApplyContext,
    ApplyStage,
    GradientContext,
    GradientStage,
    HistoryEntry,
    LLMApply,
    LLMGradient,
    OptimizerCaller,
    ProposalError,
    parse_proposal,
    validate_proposal,
)
from ._stores import MemoryStore, SQLiteStore
from ._trainer import OptimizationResult, optimize
from ._types import Completion, Example, MetricResult, OutcomeError, RateLimitSnapshot, Usage

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRICES",
    "ApplyContext",
    "ApplyStage",
    "AuthenticationError",
    "BadRequestError",
    "Budget",
    "BudgetExceededError",
    "BudgetMeter",
    "Cache",
    "CacheConflictError",
    "CacheError",
    "CacheStatistics",
    "CacheStore",
    "CachedPrediction",
    "CallResult",
    "CallTimeoutError",
    "ChatModel",
    "Completion",
    "ConfigError",
    "ConnectionFailedError",
    "DataError",
    "Emitter",
    "Endpoint",
    "EndpointStatistics",
    "EndpointUnreachableError",
    "EngineError",
    "Evaluation",
    "Event",
    "EventCallback",
    "Example",
    "GlobalMetric",
    "GradientContext",
    "GradientStage",
    "HistoryEntry",
    "LLMApply",
    "LLMGradient",
    "LimiterStatistics",
    "Limits",
    "MemoryStore",
    "Metric",
    "MetricError",
    "MetricResult",
    "NoContentError",
    "OptimizationResult",
    "OptimizerCaller",
    "Outcome",
    "OutcomeError",
    "PermanentError",
    "PostgresStore",
    "Price",
    "Prompt",
    "ProposalError",
    "ProposalRecord",
    "ProviderError",
    "QuotaExceededError",
    "RateLimitSnapshot",
    "RateLimitedError",
    "RateLimiter",
    "RetryPolicy",
    "RunReport",
    "SQLiteStore",
    "StepRecord",
    "TransientError",
    "Usage",
    "copy_cache",
    "evaluate",
    "metric_identity",
    "metrics",
    "optimize",
    "parse_json_object",
    "parse_proposal",
    "redact_event",
    "redact_text",
    "validate_examples",
    "validate_proposal",
]
