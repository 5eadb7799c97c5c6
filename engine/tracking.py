"""Experiment tracking: `MLflowLogger` logs an optimization as an MLflow run.

    from engine.tracking import MLflowLogger
    logger = MLflowLogger("file:./mlruns", experiment="prompts")
    result = await optimize(..., on_event=logger)
    logger.log_report(result.report)        # params, cost, best prompt, report files

OpenTelemetry spans and metrics need no object: see `engine.tracing.instrument`.
"""

from .tracing import MLflowLogger, instrument

__all__ = ["MLflowLogger", "instrument"]
