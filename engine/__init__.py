"""textgrad-engine: an asynchronous engine for text-gradient prompt optimization.

Public API::

    from engine import Prompt, Example, Limits, evaluate, optimize, Cache
    from engine.metrics import ExactMatch          # per-example and global metrics
    from engine.stages import LLMApply             # the stage toolkit
    from engine.testing import ScriptedModel       # test doubles

Everything listed in ``__all__`` here and in the public submodules (``metrics``,
``stages``, ``data``, ``testing``, ``bench``, ``cluster``, ``tracing``, ``tracking``) is
supported; modules starting with ``_`` are not.  ``engine.cluster`` imports Ray only when
a cluster starts; ``engine.tracing`` (OpenTelemetry spans and metrics) and
``engine.tracking`` (MLflow) import nothing of either until the host uses them.
"""

from . import data, metrics, stages, testing
from ._budget import DEFAULT_PRICES, Budget, Price
from ._closeable import AsyncCloseable
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
    GlobalMetricError,
    MetricError,
    MetricTimeoutError,
    NoContentError,
    PermanentError,
    ProgramError,
    ProviderError,
    QuotaExceededError,
    RateLimitedError,
    StageError,
    StrayCancellationError,
    TooManyErrorsError,
    TransientError,
)
from ._evaluate import evaluate, validate_examples
from ._events import Event, EventCallback
from ._outcome import Evaluation, GlobalMetric, Outcome
from ._prompt import Prompt
from ._protocols import CacheStore, ChatModel, Metric
from ._redact import redact_event, register_secret
from ._types import (
    Completion,
    ErrorInfo,
    Example,
    MetricResult,
    ProgramCall,
    RateLimitSnapshot,
    Usage,
)
from .cache import (
    Cache,
    CachedPrediction,
    CacheStatistics,
    MemoryStore,
    PostgresStore,
    SQLiteStore,
    copy_cache,
)
from .endpoint import Endpoint, EndpointStatistics, Limits, RetryPolicy, estimate_text_tokens
from .report import ProposalRecord, RunReport, StepRecord
from .stages import ApplyContext, ApplyStage, GradientContext, GradientStage, ProposalError
from .training import OptimizationResult, TrainerSettings, optimize

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRICES",
    "ApplyContext",
    "ApplyStage",
    "AsyncCloseable",
    "AuthenticationError",
    "BadRequestError",
    "Budget",
    "BudgetExceededError",
    "Cache",
    "CacheConflictError",
    "CacheError",
    "CacheStatistics",
    "CacheStore",
    "CachedPrediction",
    "CallTimeoutError",
    "ChatModel",
    "Completion",
    "ConfigError",
    "ConnectionFailedError",
    "DataError",
    "Endpoint",
    "EndpointStatistics",
    "EndpointUnreachableError",
    "EngineError",
    "ErrorInfo",
    "Evaluation",
    "Event",
    "EventCallback",
    "Example",
    "GlobalMetric",
    "GlobalMetricError",
    "GradientContext",
    "GradientStage",
    "Limits",
    "MemoryStore",
    "Metric",
    "MetricError",
    "MetricResult",
    "MetricTimeoutError",
    "NoContentError",
    "OptimizationResult",
    "Outcome",
    "PermanentError",
    "PostgresStore",
    "Price",
    "ProgramCall",
    "ProgramError",
    "Prompt",
    "ProposalError",
    "ProposalRecord",
    "ProviderError",
    "QuotaExceededError",
    "RateLimitSnapshot",
    "RateLimitedError",
    "RetryPolicy",
    "RunReport",
    "SQLiteStore",
    "StageError",
    "StepRecord",
    "StrayCancellationError",
    "TooManyErrorsError",
    "TrainerSettings",
    "TransientError",
    "Usage",
    "copy_cache",
    "data",
    "estimate_text_tokens",
    "evaluate",
    "metrics",
    "optimize",
    "redact_event",
    "register_secret",
    "stages",
    "testing",
    "validate_examples",
]
