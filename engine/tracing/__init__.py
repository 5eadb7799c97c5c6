"""Observability in production: OpenTelemetry spans and metrics, MLflow runs.

Neither is a dependency: ``import engine`` imports nothing of OpenTelemetry or MLflow.
Spans and metrics are recorded when the host has set OpenTelemetry providers (or
passes them to `instrument`); `MLflowLogger` logs a run to MLflow as its ``on_event``.
"""

from ._mlflow import MLflowLogger
from ._otel import attempt_span, instrument, instrumented, mark_example, run_span, span
from ._propagate import OTEL_ENV_FLAG, adopt_trace, trace_carrier
from ._setup import configure_sdk

__all__ = [
    "OTEL_ENV_FLAG",
    "MLflowLogger",
    "adopt_trace",
    "attempt_span",
    "configure_sdk",
    "instrument",
    "instrumented",
    "mark_example",
    "run_span",
    "span",
    "trace_carrier",
]
