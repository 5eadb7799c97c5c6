"""`MLflowLogger`: an optimization as an MLflow run, through the event stream.

Pass it as ``on_event=`` to `engine.optimize`; it logs each step's scores as metrics
with the step number (step 0 is the initial prompt, as in the report's plot), and
`MLflowLogger.log_report` logs the parameters, calls, cost, the best prompt and the
report files as artifacts at the end.  It talks to MLflow through ``MlflowClient``
(no global active run), imports ``mlflow`` only when first used (``pip install
textgrad-engine[mlflow]``; ``mlflow-skinny`` is enough), and never lets a tracking
failure stop the optimization: it is logged on the ``engine.tracking`` logger and kept
in ``errors``.

Resuming: give the ``run_id`` of the earlier run (the CLI keeps it in the output
directory) and the same MLflow run continues.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._events import Event
from .._redact import redact_text

if TYPE_CHECKING:
    from ..report import RunReport

__all__ = ["MLflowLogger"]

_log = logging.getLogger("engine.tracking")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


class MLflowLogger:
    """Log an optimization to MLflow; use as ``on_event=MLflowLogger(...)``.

    Parameters:
        tracking_uri: where runs go (``file:/path``, ``http://host:5000``,
            ``databricks``); ``None`` means MLflow's own default (``MLFLOW_TRACKING_URI``).
        experiment: the experiment's name (created when missing); ``None``: MLflow's
            default experiment.
        run_id: continue this run (a resumed optimization) instead of starting one.
        run_name: a name for a new run.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self._run_id = run_id
        self._client: Any = None
        self.errors: list[str] = []

    # -- the run ----------------------------------------------------------------------
    @property
    def client(self) -> Any:
        """The ``MlflowClient`` (imported on first use)."""
        if self._client is None:
            tracking = importlib.import_module("mlflow.tracking")
            self._client = tracking.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def run_id(self) -> str:
        """The MLflow run's id, starting the run (or reopening ``run_id``) on first use."""
        if self._run_id is None:
            client = self.client
            experiment_id = "0"
            if self.experiment is not None:
                found = client.get_experiment_by_name(self.experiment)
                experiment_id = (
                    found.experiment_id if found else client.create_experiment(self.experiment)
                )
            run = client.create_run(experiment_id, run_name=self.run_name)
            self._run_id = str(run.info.run_id)
        return self._run_id

    def _safely(self, what: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(self.client, what)(self.run_id, *args, **kwargs)
        except Exception as exc:  # tracking must never stop an optimization
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
            _log.warning("MLflow %s failed: %s: %s", what, type(exc).__name__, exc)

    # -- the events -------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        data = event.data
        if event.name == "optimize.started":
            self._metrics({"train_score": data.get("score")}, step=0)
        elif event.name == "optimize.step":
            step = int(data.get("step", 0)) + 1  # step 0 is the initial prompt
            self._metrics(
                {
                    "batch_score": data.get("batch_score"),
                    "train_score": data.get("best_score"),
                    "val_score": data.get("val_score"),
                    "calls": data.get("calls"),
                    "proposals": data.get("proposals"),
                },
                step=step,
            )
        elif event.name == "optimize.finished":
            self._metrics(
                {"final_train_score": data.get("score"), "final_val_score": data.get("val_score")},
                step=int(data.get("steps") or 0),
            )

    def _metrics(self, values: Mapping[str, Any], *, step: int) -> None:
        for key, value in values.items():
            number = _number(value)
            if number is not None:
                self._safely("log_metric", key, number, step=step)

    # -- the end ----------------------------------------------------------------------
    def log_report(self, report: RunReport, files: Mapping[str, Path] | None = None) -> None:
        """Log the run's parameters, calls and cost, the best prompt, and the report:
        ``files`` (name -> path: report.json, report.html, the plot) when written
        already, else the JSON and HTML rendered here.  Records the run id in
        ``report.tracking["mlflow_run_id"]`` and ends the run."""
        try:
            report.tracking["mlflow_run_id"] = self.run_id
        except Exception as exc:  # no run to log to: say so, and stop here
            self.errors.append(f"create_run: {type(exc).__name__}: {exc}")
            _log.warning("MLflow run not started: %s: %s", type(exc).__name__, exc)
            return
        params = {k: str(v)[:500] for k, v in report.settings.items()}
        try:
            self.client.log_batch(self.run_id, params=_params(params))
        except Exception as exc:  # a resumed run already has them
            self.errors.append(f"log_batch: {type(exc).__name__}: {exc}")
        self._metrics({f"calls.{m}": n for m, n in report.calls.items()}, step=len(report.steps))
        self._metrics({"cost_usd": report.cost, "errors": report.errors}, step=len(report.steps))
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            prompt = folder / "best_prompt.json"
            prompt.write_text(
                redact_text(json.dumps(report.best_prompt, ensure_ascii=False, indent=2))
            )
            paths = [prompt]
            if files:
                paths.extend(Path(p) for p in files.values() if Path(p).exists())
            else:
                (folder / "report.json").write_text(redact_text(report.to_json()))
                (folder / "report.html").write_text(redact_text(report.to_html()))
                paths.extend([folder / "report.json", folder / "report.html"])
                with contextlib.suppress(ImportError):  # matplotlib is optional
                    paths.append(report.plot(folder / "scores.png"))
            for path in paths:
                self._safely("log_artifact", str(path))
        self._safely("set_terminated")


def _params(values: Mapping[str, str]) -> list[Any]:
    entities = importlib.import_module("mlflow.entities")
    return [entities.Param(k, v) for k, v in values.items()]
