"""One trace over a cluster run: the driver's trace context travels with the job.

The driver injects the current context into a plain dict (W3C ``traceparent``) that is
pickled with the job; a worker adopts it before it evaluates, so its spans are children
of the driver's ``evaluate`` span.  The worker's spans reach a backend when the worker
process has a tracer provider (``--otel`` sets one up in every process it starts).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from ._otel import current_run

__all__ = ["OTEL_ENV_FLAG", "adopt_trace", "trace_carrier"]

# Set by the CLI's --otel: processes it starts (Ray workers) set up the SDK too.
OTEL_ENV_FLAG = "TEXTGRAD_OTEL"


def trace_carrier() -> dict[str, str]:
    """The current trace context as W3C headers; empty when the run is not traced."""
    if current_run() is None:
        return {}
    carrier: dict[str, str] = {}
    importlib.import_module("opentelemetry.propagate").inject(carrier)
    return carrier


def adopt_trace(carrier: Mapping[str, str]) -> None:
    """Continue the driver's trace in this task (a worker's call runs in its own task,
    so the attached context ends with it)."""
    if not carrier:
        return
    if os.environ.get(OTEL_ENV_FLAG):
        from ._setup import configure_sdk

        configure_sdk()
    try:
        propagate = importlib.import_module("opentelemetry.propagate")
        context = importlib.import_module("opentelemetry.context")
    except ImportError:  # the worker has no OpenTelemetry: nothing to continue
        return
    context.attach(propagate.extract(dict(carrier)))
