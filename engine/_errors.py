"""The engine's one exception tree.

    EngineError
    ├── ConfigError (also ValueError)    bad input, caught before the first paid call
    │   └── DataError                    names the row and field of a dataset
    ├── ProviderError                    a model endpoint failed; carries the endpoint
    │   ├── RateLimitedError             429; carries Retry-After        (retried)
    │   ├── TransientError               5xx, timeouts, dropped, malformed (retried)
    │   │   ├── CallTimeoutError         no answer within the call timeout
    │   │   └── ConnectionFailedError    could not connect (refused, DNS): feeds the breaker
    │   ├── PermanentError               never retried
    │   │   ├── BadRequestError          400 / 404 / 422: the request itself is wrong
    │   │   ├── NoContentError           an answer with no text (refusal, tool call, filter)
    │   │   ├── AuthenticationError      401 / 403: fatal for the whole run
    │   │   └── QuotaExceededError       429 insufficient_quota: billing, fatal
    │   └── EndpointUnreachableError     the circuit breaker is open: fatal
    ├── MetricError                      a metric raised or returned a bad score
    │   ├── MetricTimeoutError           a metric call past its timeout
    │   └── GlobalMetricError            the global metric raised or left [0, 1]
    ├── CacheError                       the cache store is unreadable or corrupted
    │   └── CacheConflictError           a reused example id with changed inputs
    ├── BudgetExceededError              a call, token or money cap was reached
    ├── TooManyErrorsError               the best prompt's score rests on too many errors
    ├── StageError                       a trainer stage failing for good (report attached)
    ├── ProgramError                     a program raised on one example: that example's error
    └── StrayCancellationError           a CancelledError nobody asked for: one example's error

Adapters translate their SDK's errors into this tree with ``raise ... from exc`` so the
retry policy decides on the engine's classes alone.  Every message is passed through
secret redaction before it is stored, so an API key never lands in an error text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._redact import redact_text

if TYPE_CHECKING:
    from ._usage import Usage

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BudgetExceededError",
    "CacheConflictError",
    "CacheError",
    "CallTimeoutError",
    "ConfigError",
    "ConnectionFailedError",
    "DataError",
    "EndpointUnreachableError",
    "EngineError",
    "GlobalMetricError",
    "MetricError",
    "MetricTimeoutError",
    "NoContentError",
    "PermanentError",
    "ProgramError",
    "ProviderError",
    "QuotaExceededError",
    "RateLimitedError",
    "StageError",
    "StrayCancellationError",
    "TooManyErrorsError",
    "TransientError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(EngineError, ValueError):
    """The caller's input is invalid; raised before any paid call is made."""


class DataError(ConfigError):
    """A dataset row is invalid.  ``location`` names the file/row and field."""

    def __init__(self, message: str, *, location: str | None = None) -> None:
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class ProviderError(EngineError):
    """A call to a model endpoint failed.

    ``retryable`` tells the retry policy whether another attempt may succeed;
    ``fatal`` errors (bad credentials) end the whole run whatever the error policy.
    """

    retryable: bool = False
    fatal: bool = False
    attempts: int = 1  # set by the endpoint to the attempts made before giving up
    timeouts: int = 0  # set by the endpoint: how many of those attempts timed out
    hedges: int = 0  # set by the endpoint: how many of those attempts were hedges
    sent: bool = True  # False when the engine refused before sending (a bounded wait)
    # tokens the provider billed for this failed attempt (an answer with usage but no
    # usable choice): the endpoint charges them like a success's
    billed: Usage | None = None
    # most attempts a failure of this kind gets, whatever the policy (None: the policy's)
    attempt_cap: int | None = None

    def __init__(
        self, message: str, *, endpoint: str | None = None, status: int | None = None
    ) -> None:
        self.endpoint = redact_text(endpoint) if endpoint else None
        self.status = status
        self.detail = redact_text(message)  # the message without status and endpoint
        where = f" [{self.endpoint}]" if self.endpoint else ""
        code = f" (HTTP {status})" if status is not None else ""
        super().__init__(f"{message}{code}{where}")


class RateLimitedError(ProviderError):
    """The endpoint refused the call for rate limiting; ``retry_after`` in seconds."""

    retryable = True

    def __init__(
        self,
        message: str = "rate limited",
        *,
        retry_after: float | None = None,
        endpoint: str | None = None,
        status: int | None = 429,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, endpoint=endpoint, status=status)


class TransientError(ProviderError):
    """A failure another attempt may not see: 5xx, dropped connection, malformed body."""

    retryable = True


class CallTimeoutError(TransientError):
    """The endpoint did not answer within the per-call timeout."""


class ConnectionFailedError(TransientError):
    """No connection could be made (refused, unknown host, connect timeout).

    Retried like any transient failure, but counted by the endpoint's circuit breaker:
    many in a row with no success since mean nothing is listening.
    """


class PermanentError(ProviderError):
    """A failure that another attempt would repeat."""


class BadRequestError(PermanentError):
    """The request was rejected as invalid (400, 404, 422)."""


class NoContentError(PermanentError):
    """The endpoint answered without text: a refusal, a tool call, a content filter.

    ``finish_reason`` is what the endpoint gave; ``refusal`` holds a refusal's text.
    Never turned into an empty prediction: the example gets this error as its outcome.
    """

    def __init__(
        self,
        message: str,
        *,
        finish_reason: str | None = None,
        refusal: str | None = None,
        endpoint: str | None = None,
        status: int | None = None,
    ) -> None:
        self.finish_reason = finish_reason
        self.refusal = refusal
        super().__init__(message, endpoint=endpoint, status=status)


class AuthenticationError(PermanentError):
    """The endpoint rejected the credentials (401, 403); ends the run."""

    fatal = True


class QuotaExceededError(PermanentError):
    """The account is out of quota (OpenAI: 429 with ``insufficient_quota``).

    Looks like a rate limit but waiting does not help: fatal for the run.
    """

    fatal = True


class EndpointUnreachableError(ProviderError):
    """The endpoint's circuit breaker is open: many connection failures in a row and no
    success since.  Every waiting call fails at once; fatal for the run."""

    fatal = True


class ProgramError(EngineError):
    """A program (``evaluate(..., program=...)``) raised on one example.

    Like a provider error, it ends that example with an error outcome (stage
    ``"program"``); the cause is chained.  A `ConfigError` raised by its ``lm`` (an
    unknown prompt name, a missing variable) is not one: it stops the evaluation.
    """


class MetricError(EngineError):
    """A metric raised, or returned something that is not a score in [0, 1]."""


class CacheError(EngineError):
    """The cache store cannot be read or written, or holds corrupted data."""


class CacheConflictError(CacheError):
    """An example id seen before now comes with different inputs."""


class BudgetExceededError(EngineError):
    """A budget cap (calls, tokens or money) was reached."""


class TooManyErrorsError(EngineError):
    """More examples errored than ``max_error_rate`` allows where a decision depends on
    it: optimizing on such a score would be optimizing on noise.

    ``report`` holds the run's report up to the stop (a `RunReport`).
    """

    def __init__(self, message: str, *, report: object = None) -> None:
        self.report = report
        super().__init__(message)


class GlobalMetricError(MetricError):
    """The global metric raised, or returned something that is not a score in [0, 1].

    ``report`` holds the run's report up to the stop when `optimize` raised it."""

    def __init__(self, message: str, *, report: object = None) -> None:
        self.report = report
        super().__init__(message)


class MetricTimeoutError(MetricError):
    """A metric call did not return within the metric timeout."""


class StageError(EngineError):
    """A stage (describe, gradient or apply) that cannot work: a permanent error (bad
    request, model not found) on every call it made.  ``stage`` names it; ``report``
    holds the run's report up to the stop (a `RunReport`)."""

    def __init__(self, message: str, *, stage: str, report: object = None) -> None:
        self.stage = stage
        self.report = report
        super().__init__(message)


class StrayCancellationError(EngineError):
    """A model or metric raised ``CancelledError`` while this evaluation was not being
    cancelled (an inner task of theirs, cancelled elsewhere): an error of that example."""
