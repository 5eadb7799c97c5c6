"""The CLI's observability: ``--otel`` (the OpenTelemetry SDK from ``OTEL_*``) and
``[tracking] mlflow`` (an `MLflowLogger` whose run a rerun of the command continues).

An application's choices, kept out of the library: the SDK is configured here, and a
``file:`` tracking URI named in a run file is allowed (MLflow 3 asks for
``MLFLOW_ALLOW_FILE_STORE=true`` before it uses its file store).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._events import Event, EventCallback
from ..tracing import OTEL_ENV_FLAG, MLflowLogger, configure_sdk
from ._outputs import write_private
from ._runfile import RunFile

__all__ = ["RUN_ID_FILE", "add_otel_argument", "listen", "mlflow_logger", "start_otel"]

RUN_ID_FILE = "mlflow_run_id"  # in the output folder: a rerun continues this MLflow run


def add_otel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--otel",
        action="store_true",
        help="export OpenTelemetry traces and metrics (OTLP when installed, configured "
        "by the OTEL_* variables; else the console on stderr)",
    )


def start_otel(args: argparse.Namespace) -> None:
    """With ``--otel``: set up the SDK in this process and in the workers it starts."""
    if not getattr(args, "otel", False):
        return
    try:
        kind = configure_sdk()
    except ImportError:
        sys.stderr.write(
            "--otel needs the OpenTelemetry SDK: pip install opentelemetry-sdk "
            "(and opentelemetry-exporter-otlp to export over OTLP)\n"
        )
        raise SystemExit(2) from None
    os.environ[OTEL_ENV_FLAG] = "1"  # Ray workers inherit it and set up their own SDK
    sys.stderr.write(f"OpenTelemetry: exporting traces and metrics to {kind}\n")


def _tracking_uri(uri: str, run_file: Path) -> str:
    if uri.startswith("file:"):
        path = Path(uri[len("file:") :])
        if not path.is_absolute():
            path = run_file.parent / path
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return f"file:{path}"
    return uri


def mlflow_logger(run: RunFile, out: Path) -> MLflowLogger | None:
    """The run file's MLflow logger, its run started (or continued: the id of an earlier
    run of this command is in the output folder); None without ``[tracking] mlflow``."""
    section: Mapping[str, Any] = run.raw.get("tracking") or {}
    uri = section.get("mlflow")
    if not uri:
        return None
    saved = out / RUN_ID_FILE
    logger = MLflowLogger(
        _tracking_uri(str(uri), run.path),
        section.get("experiment"),
        run_id=saved.read_text().strip() if saved.is_file() else None,
        run_name=section.get("run_name"),
    )
    try:
        write_private(saved, logger.run_id + "\n")
    except Exception as exc:  # tracking must not stop the run it tracks
        sys.stderr.write(f"MLflow tracking off: {type(exc).__name__}: {exc}\n")
        return None
    return logger


def listen(first: EventCallback, second: EventCallback | None) -> EventCallback:
    """One callback that feeds both (the progress line, then the tracker)."""
    if second is None:
        return first

    def both(event: Event) -> None:
        first(event)
        second(event)

    return both
