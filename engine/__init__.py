"""textgrad-engine: an asynchronous engine for text-gradient prompt optimization.

Public API::

    from engine import Prompt, Example, Limits, evaluate, Cache, metrics

Everything listed in ``__all__`` is supported; modules starting with ``_`` are not.
"""

from __future__ import annotations

from . import metrics
from ._cache import Cache, CachedPrediction, CacheStatistics, metric_identity
from ._endpoint import CallResult, Endpoint, EndpointStatistics
from ._errors import (
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    CacheConflictError,
    CacheError,
    CallTimeoutError,
    ConfigError,
    DataError,
    EngineError,
    MetricError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from ._evaluate import Evaluation, GlobalMetric, Outcome, evaluate, validate_examples
from ._events import Emitter, Event, EventCallback
from ._limits import LimiterStatistics, Limits, RateLimiter
from ._parsing import parse_json_object
from ._prompt import Prompt
from ._protocols import CacheStore, ChatModel, Metric
from ._redact import redact_event, redact_text
from ._retry import RetryPolicy
from ._stores import MemoryStore, SQLiteStore
from ._types import Completion, Example, MetricResult, OutcomeError, RateLimitSnapshot, Usage

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
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
    "DataError",
    "Emitter",
    "Endpoint",
    "EndpointStatistics",
    "EngineError",
    "Evaluation",
    "Event",
    "EventCallback",
    "Example",
    "GlobalMetric",
    "LimiterStatistics",
    "Limits",
    "MemoryStore",
    "Metric",
    "MetricError",
    "MetricResult",
    "Outcome",
    "OutcomeError",
    "PermanentError",
    "Prompt",
    "ProviderError",
    "RateLimitSnapshot",
    "RateLimitedError",
    "RateLimiter",
    "RetryPolicy",
    "SQLiteStore",
    "TransientError",
    "Usage",
    "evaluate",
    "metric_identity",
    "metrics",
    "parse_json_object",
    "redact_event",
    "redact_text",
    "validate_examples",
]
