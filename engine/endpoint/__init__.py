"""The call path to one provider endpoint: limits, retries, circuit breaker, tokens."""

from ._ceiling import FLOOR_RPM, RateCeiling
from ._endpoint import _SHARED_ATTRIBUTE, Endpoint, EndpointStatistics, estimate_request_tokens
from ._limits import Limits, _plausible
from ._retry import RetryPolicy
from ._tokens import estimate_text_tokens

__all__ = [
    "FLOOR_RPM",
    "_SHARED_ATTRIBUTE",
    "Endpoint",
    "EndpointStatistics",
    "Limits",
    "RateCeiling",
    "RetryPolicy",
    "_plausible",
    "estimate_request_tokens",
    "estimate_text_tokens",
]
