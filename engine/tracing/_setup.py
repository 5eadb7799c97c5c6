"""`configure_sdk`: the OpenTelemetry SDK for the CLI's ``--otel`` (an application's job,
never done by the library on its own).

Traces and metrics go to the OTLP exporter when ``opentelemetry-exporter-otlp`` is
installed, configured by the standard ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``...); else to the console (stderr, so
the progress line and ``--json`` output on stdout stay clean).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

__all__ = ["configure_sdk"]


def _exporters() -> tuple[Any, Any, str]:
    try:
        traces = importlib.import_module("opentelemetry.exporter.otlp.proto.http.trace_exporter")
        metrics = importlib.import_module("opentelemetry.exporter.otlp.proto.http.metric_exporter")
        return traces.OTLPSpanExporter(), metrics.OTLPMetricExporter(), "otlp"
    except ImportError:
        pass
    trace_sdk = importlib.import_module("opentelemetry.sdk.trace.export")
    metric_sdk = importlib.import_module("opentelemetry.sdk.metrics.export")
    return (
        trace_sdk.ConsoleSpanExporter(out=sys.stderr),
        metric_sdk.ConsoleMetricExporter(out=sys.stderr),
        "console",
    )


def configure_sdk() -> str:
    """Set the global tracer and meter providers once per process; returns where they
    export (``"otlp"``, ``"console"``, or ``"already set"``).  Raises `ImportError`
    when ``opentelemetry-sdk`` is not installed."""
    trace = importlib.import_module("opentelemetry.trace")
    if type(trace.get_tracer_provider()).__name__ != "ProxyTracerProvider":
        return "already set"
    metrics = importlib.import_module("opentelemetry.metrics")
    sdk_trace = importlib.import_module("opentelemetry.sdk.trace")
    sdk_trace_export = importlib.import_module("opentelemetry.sdk.trace.export")
    sdk_metrics = importlib.import_module("opentelemetry.sdk.metrics")
    sdk_metrics_export = importlib.import_module("opentelemetry.sdk.metrics.export")
    resources = importlib.import_module("opentelemetry.sdk.resources")
    span_exporter, metric_exporter, kind = _exporters()
    resource = resources.Resource.create({"service.name": "textgrad-engine"})  # OTEL_* win
    tracer_provider = sdk_trace.TracerProvider(resource=resource)
    tracer_provider.add_span_processor(sdk_trace_export.BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(tracer_provider)
    reader = sdk_metrics_export.PeriodicExportingMetricReader(metric_exporter)
    metrics.set_meter_provider(
        sdk_metrics.MeterProvider(resource=resource, metric_readers=[reader])
    )
    return kind
