"""MLflow (issue #24): an optimization as an MLflow run, offline on a file store.

Real parts: ``mlflow-skinny``'s client on a ``file:`` store in ``tmp_path`` (MLflow 3
keeps the file store behind ``MLFLOW_ALLOW_FILE_STORE=true``), a real optimization on
the arithmetic task, and the CLI end to end in a subprocess for the run-file wiring.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters import ArithmeticCoach, ArithmeticModel, arithmetic_examples
from engine import optimize
from engine.metrics import ExactMatch
from engine.tracking import MLflowLogger
from tests.conftest import qa_prompt

pytest.importorskip("mlflow")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file:{tmp_path / 'mlruns'}"


async def _optimize(on_event: Any) -> Any:
    data = arithmetic_examples(40)
    return await optimize(
        qa_prompt(),
        data[:30],
        valset=data[30:],
        metric=ExactMatch(),
        model=ArithmeticModel(habits=("chatty",)),
        optimizer_model=ArithmeticCoach(),
        optimizer_model_name="coach",
        on_event=on_event,
    )


def _history(client: Any, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


async def test_a_run_holds_params_step_metrics_and_artifacts(store: str) -> None:
    logger = MLflowLogger(store, experiment="prompts", run_name="arith")
    result = await _optimize(logger)
    logger.log_report(result.report)
    assert logger.errors == []
    run_id = result.report.tracking["mlflow_run_id"]
    client = logger.client
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == "prompts"
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["batch_size"] == "4" and params["train_size"] == "30"
    report = result.report
    train = _history(client, run_id, "train_score")
    assert train[0] == report.initial_score  # step 0: the initial prompt
    assert [train[s.step + 1] for s in report.steps] == [s.best_score for s in report.steps]
    batch = _history(client, run_id, "batch_score")
    assert [batch[s.step + 1] for s in report.steps] == [s.batch_score for s in report.steps]
    val = _history(client, run_id, "val_score")
    assert [val[s.step + 1] for s in report.steps] == [s.val_score for s in report.steps]
    assert set(_history(client, run_id, "calls")) == {s.step + 1 for s in report.steps}
    assert run.data.metrics["calls.demo"] == report.calls["demo"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best_prompt.json", "report.json", "report.html"} <= artifacts
    folder = Path(client.download_artifacts(run_id, "", str(Path(store[5:]).parent / "dl")))
    assert json.loads((folder / "best_prompt.json").read_text()) == report.best_prompt
    assert json.loads((folder / "report.json").read_text())["tracking"] == {
        "mlflow_run_id": run_id
    }


async def test_a_resumed_logger_continues_the_same_run(store: str) -> None:
    first = MLflowLogger(store, experiment="prompts")
    first_result = await _optimize(first)
    first.log_report(first_result.report)
    run_id = first.run_id
    again = MLflowLogger(store, experiment="prompts", run_id=run_id)
    result = await _optimize(again)
    again.log_report(result.report)
    assert result.report.tracking["mlflow_run_id"] == run_id
    client = again.client
    runs = client.search_runs([client.get_experiment_by_name("prompts").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert len(client.get_metric_history(run_id, "train_score")) == 2 * (
        len(result.report.steps) + 1
    )


async def test_a_tracking_failure_never_stops_the_optimization(tmp_path: Path) -> None:
    # the file store refused (MLFLOW_ALLOW_FILE_STORE unset), a typical misconfiguration
    logger = MLflowLogger(f"file:{tmp_path / 'refused'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
        result = await _optimize(logger)
        logger.log_report(result.report)
    assert result.score == 1.0
    assert logger.errors and "mlflow_run_id" not in result.report.tracking
