"""MLflow (issue #24): an optimization as an MLflow run, offline on a file store.

Real parts: ``mlflow-skinny``'s client on a ``file:`` store in ``tmp_path`` (MLflow 3
keeps the file store behind ``MLFLOW_ALLOW_FILE_STORE=true``), a real optimization on
the arithmetic task, and the CLI end to end in a subprocess for the run-file wiring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
    assert json.loads((folder / "report.json").read_text())["tracking"] == {"mlflow_run_id": run_id}


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


ROOT = Path(__file__).resolve().parents[1]


def _demo_run(folder: Path) -> Path:
    """The bundled demo run, writing into ``folder``, with a ``[tracking]`` section."""
    for name in ("prompt.json", "arithmetic_train.jsonl", "arithmetic_val.jsonl"):
        shutil.copy(ROOT / "examples" / name, folder / name)
    text = (ROOT / "examples" / "demo.toml").read_text()
    text = text.replace("../out/demo/cache.sqlite", "cache.sqlite")
    text = text.replace('"../out/demo"', '"out"')
    text += '\n[tracking]\nmlflow = "file:mlruns"\nexperiment = "demo"\n'
    (folder / "demo.toml").write_text(text)
    return folder / "demo.toml"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_the_cli_logs_to_mlflow_continues_the_run_and_exports_spans(tmp_path: Path) -> None:
    """``[tracking] mlflow`` in a run file; a rerun continues the same MLflow run;
    ``--otel`` exports spans (to the console on stderr: no OTLP exporter installed),
    and stdout stays one JSON summary."""
    run_file = _demo_run(tmp_path)
    done = _cli("optimize", str(run_file), "--otel")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["score"] == 1.0
    assert '"name": "optimize"' in done.stderr and '"name": "chat demo"' in done.stderr
    out = tmp_path / "out"
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert json.loads((out / "report.json").read_text())["tracking"] == {"mlflow_run_id": run_id}
    again = _cli("optimize", str(run_file), "--quiet")  # the rerun: all cache hits
    assert again.returncode == 0, again.stderr
    assert (out / "mlflow_run_id").read_text().strip() == run_id

    from mlflow.tracking import MlflowClient

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
        experiment = client.get_experiment_by_name("demo")
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.run_id for r in runs] == [run_id]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best_prompt.json", "report.json", "report.html", "scores.png"} <= artifacts
