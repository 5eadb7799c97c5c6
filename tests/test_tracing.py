"""OpenTelemetry (issue #24): spans of evaluate and optimize, metrics, content policy.

Real SDK parts: a `TracerProvider` with an in-memory exporter and a `MeterProvider` with
an in-memory reader, handed to the run through `engine.tracing.instrument` (the global
providers of this process stay unset, as in a host that never configured
OpenTelemetry; tests that need them set run in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters import ArithmeticCoach, ArithmeticModel, arithmetic_examples
from engine import (
    Endpoint,
    RetryPolicy,
    TransientError,
    evaluate,
    optimize,
    register_secret,
)
from engine.metrics import ExactMatch
from engine.testing import ScriptedModel, ScriptedRequest
from engine.tracing import instrument
from tests.conftest import echo_examples, echo_model, qa_prompt


@dataclass
class Telemetry:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer_provider: TracerProvider
    meter_provider: MeterProvider

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def metrics(self) -> dict[str, list[Any]]:
        """Instrument name -> its data points."""
        found: dict[str, list[Any]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found.setdefault(metric.name, []).extend(metric.data.data_points)
        return found


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield Telemetry(exporter, reader, tracer_provider, meter_provider)
    tracer_provider.shutdown()
    meter_provider.shutdown()


def _fail_first_attempt_of(questions: set[str]) -> Any:
    def plan(request: ScriptedRequest) -> BaseException | None:
        if request.attempt == 1 and request.messages[-1]["content"] in questions:
            return TransientError("injected server error", endpoint="scripted", status=500)
        return None

    return plan


@pytest.mark.looptime
async def test_evaluate_of_50_with_5_failing_once_has_55_attempt_spans(
    telemetry: Telemetry,
) -> None:
    examples = echo_examples(50)
    model = ScriptedModel(
        lambda r: r.messages[-1]["content"],
        faults=_fail_first_attempt_of({f"item {i}" for i in range(5)}),
    )
    endpoint = Endpoint(model, retry=RetryPolicy(base_delay=0.01))
    with instrument(
        tracer_provider=telemetry.tracer_provider, meter_provider=telemetry.meter_provider
    ):
        evaluation = await evaluate(qa_prompt(), examples, model=endpoint, metric=ExactMatch())
    assert evaluation.scored == 50 and evaluation.errors == 0

    spans = telemetry.finished()
    (root,) = [s for s in spans if s.name == "evaluate"]
    attempts = [s for s in spans if s.name == "chat demo"]
    assert len(attempts) == 55
    assert {s.parent.span_id for s in attempts if s.parent} == {root.context.span_id}
    assert all(s.context.trace_id == root.context.trace_id for s in attempts)
    for s in attempts:
        a = s.attributes or {}
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.provider.name"] == "scripted"
        assert a["gen_ai.request.model"] == "demo"
        assert a["engine.cache_hit"] is False
        assert str(a["engine.example.id"]).startswith("e")
        assert float(a["engine.pause.waited_s"]) >= 0.0  # type: ignore[arg-type]
    failed = [s for s in attempts if (s.attributes or {}).get("error.type")]
    assert len(failed) == 5
    assert {(s.attributes or {})["http.response.status_code"] for s in failed} == {500}
    assert {(s.attributes or {})["error.type"] for s in failed} == {"TransientError"}
    assert {(s.attributes or {})["engine.example.id"] for s in failed} == {
        f"e{i}" for i in range(5)
    }
    retried = [s for s in attempts if (s.attributes or {})["engine.retry.attempt"] == 2]
    assert {(s.attributes or {})["engine.example.id"] for s in retried} == {
        f"e{i}" for i in range(5)
    }
    answered = [s for s in attempts if s not in failed]
    assert all((s.attributes or {})["gen_ai.response.model"] == "demo" for s in answered)
    tokens_in = sum(int((s.attributes or {})["gen_ai.usage.input_tokens"]) for s in answered)  # type: ignore[arg-type]
    tokens_out = sum(int((s.attributes or {})["gen_ai.usage.output_tokens"]) for s in answered)  # type: ignore[arg-type]
    assert (tokens_in, tokens_out) == (
        evaluation.usage.prompt_tokens,
        evaluation.usage.completion_tokens,
    )
    assert (root.attributes or {})["engine.examples.completed"] == 50

    metrics = telemetry.metrics()
    requests = sum(p.value for p in metrics["engine.requests"])
    assert requests == 55
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in metrics["gen_ai.client.token.usage"]}
    assert usage == {
        "input": evaluation.usage.prompt_tokens,
        "output": evaluation.usage.completion_tokens,
    }
    assert sum(p.count for p in metrics["gen_ai.client.operation.duration"]) == 55
    assert sum(p.value for p in metrics["engine.examples.scored"]) == 50
    assert sum(p.value for p in metrics["engine.cache.misses"]) == 50
    assert {p.attributes["engine.endpoint"] for p in metrics["engine.examples.scored"]} == {
        "scripted"
    }


async def test_an_optimize_trace_has_the_step_and_proposal_structure(
    telemetry: Telemetry,
) -> None:
    data = arithmetic_examples(40)
    with instrument(tracer_provider=telemetry.tracer_provider):
        result = await optimize(
            qa_prompt(),
            data[:30],
            valset=data[30:],
            metric=ExactMatch(),
            model=ArithmeticModel(habits=("chatty",)),
            optimizer_model=ArithmeticCoach(),
            optimizer_model_name="coach",
        )
    assert result.score == 1.0
    spans = telemetry.finished()
    by_id = {s.context.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "optimize"]
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}

    def parent(s: ReadableSpan) -> str | None:
        return by_id[s.parent.span_id].name if s.parent else None

    steps = [s for s in spans if s.name == "step"]
    assert len(steps) == len(result.report.steps)
    assert {parent(s) for s in steps} == {"optimize"}
    proposals = [s for s in spans if s.name == "proposal"]
    assert proposals and {parent(s) for s in proposals} == {"step"}
    for name in ("gradient", "apply", "batch check", "full-set check"):
        found = [s for s in spans if s.name == name]
        assert found and {parent(s) for s in found} == {"proposal"}, name
    evaluations = [s for s in spans if s.name == "evaluate"]
    assert {parent(s) for s in evaluations} == {
        "optimize",  # the initial prompt on train and val
        "step",  # the best prompt on the batch, val after the step
        "batch check",
        "full-set check",
    }
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert {parent(s) for s in chats} <= {"evaluate", "gradient", "apply", "optimize"}
    assert {s.name for s in chats} == {"chat demo", "chat coach"}
    accepted = [s for s in proposals if any(e.name == "engine.accepted" for e in s.events)]
    assert len(accepted) == 1
    assert (by_id[accepted[0].parent.span_id].attributes or {})["engine.step.best_score"] == 1.0  # type: ignore[union-attr]
    assert (root.attributes or {})["engine.optimize.score"] == 1.0


async def test_no_tracer_provider_means_no_span_is_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenTelemetry imported (by this test module), its providers the default proxies:
    the engine asks once per run and starts no span, not even a no-op one."""
    from opentelemetry import trace

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a span was started with no tracer provider set")

    for tracer in (trace.ProxyTracer, trace.NoOpTracer):
        monkeypatch.setattr(tracer, "start_span", refuse)
        monkeypatch.setattr(tracer, "start_as_current_span", refuse)
    monkeypatch.setattr(trace.ProxyTracerProvider, "get_tracer", refuse)
    data = arithmetic_examples(12)
    result = await optimize(
        qa_prompt(),
        data,
        metric=ExactMatch(),
        model=ArithmeticModel(habits=("chatty",)),
        optimizer_model=ArithmeticCoach(),
        optimizer_model_name="coach",
    )
    assert result.score == 1.0


CANARY_KEY = "sk-canary-0123456789abcdefTRACE"
CANARY_PROMPT = "canary-prompt-7f3a"
CANARY_ANSWER = "canary-answer-91bc"


async def _canary_run(telemetry: Telemetry, *, capture: bool) -> str:
    register_secret(CANARY_KEY)

    def handler(request: ScriptedRequest) -> str:
        return f"{CANARY_ANSWER} {CANARY_KEY}"

    def faults(request: ScriptedRequest) -> BaseException | None:
        if request.attempt == 1:  # an error body that echoes the prompt and the key
            text = request.messages[-1]["content"]
            return TransientError(f"bad: {text} {CANARY_KEY}", endpoint="scripted", status=500)
        return None

    model = Endpoint(ScriptedModel(handler, faults=faults), retry=RetryPolicy(base_delay=0.001))
    prompt = qa_prompt(f"System {CANARY_PROMPT} {CANARY_KEY}")
    examples = echo_examples(3)
    with instrument(tracer_provider=telemetry.tracer_provider, capture_content=capture):
        await evaluate(prompt, examples, model=model, metric=ExactMatch())
    return "\n".join(s.to_json() for s in telemetry.finished())


async def test_no_prompt_completion_or_key_reaches_a_span_by_default(
    telemetry: Telemetry,
) -> None:
    dumped = await _canary_run(telemetry, capture=False)
    assert "chat demo" in dumped
    for canary in (CANARY_KEY, CANARY_PROMPT, CANARY_ANSWER, "item 1"):
        assert canary not in dumped


async def test_captured_content_is_redacted(telemetry: Telemetry) -> None:
    dumped = await _canary_run(telemetry, capture=True)
    assert CANARY_PROMPT in dumped and CANARY_ANSWER in dumped  # the host asked for text
    assert CANARY_KEY not in dumped and "[REDACTED]" in dumped
    spans = [s for s in telemetry.finished() if s.name == "chat demo"]
    messages = json.loads(str((spans[0].attributes or {})["gen_ai.input.messages"]))
    assert messages[0]["role"] == "system"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_and_running_the_engine_loads_no_opentelemetry_or_mlflow() -> None:
    """Layering: ``import engine`` (and a whole evaluate) imports neither; and with
    OpenTelemetry uninstallable the engine still runs."""
    out = _run(
        """
        import sys, anyio
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("opentelemetry", "mlflow"):
                    raise ImportError(name)
        import engine, engine.tracking, engine.tracing
        loaded = [m for m in sys.modules if m.startswith(("opentelemetry", "mlflow"))]
        sys.meta_path.insert(0, Block())
        from adapters import ArithmeticModel, arithmetic_examples
        from engine.metrics import ExactMatch
        from tests.conftest import qa_prompt
        ev = anyio.run(lambda: engine.evaluate(
            qa_prompt(), arithmetic_examples(8), model=ArithmeticModel(), metric=ExactMatch()))
        print(loaded, ev.completed)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "8"]


def test_a_global_tracer_provider_is_used_without_instrument() -> None:
    """The host's way: set the global providers once; the engine's spans follow."""
    out = _run(
        """
        import anyio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        import engine
        from adapters import ArithmeticModel, arithmetic_examples
        from engine.metrics import ExactMatch
        from tests.conftest import qa_prompt
        anyio.run(lambda: engine.evaluate(
            qa_prompt(), arithmetic_examples(8), model=ArithmeticModel(), metric=ExactMatch()))
        names = sorted(s.name for s in exporter.get_finished_spans())
        print(names.count("evaluate"), names.count("chat demo"))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "8"]


def test_metrics_scrape_through_the_prometheus_exporter() -> None:
    """The standard OpenTelemetry Prometheus exporter serves the engine's metrics on a
    real HTTP scrape (a subprocess: the exporter registers with prometheus_client's
    process-wide registry)."""
    pytest.importorskip("opentelemetry.exporter.prometheus")
    out = _run(
        """
        import anyio, urllib.request
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server
        server, thread = start_http_server(0, addr="127.0.0.1")
        metrics.set_meter_provider(MeterProvider(metric_readers=[PrometheusMetricReader()]))
        import engine
        from adapters import ArithmeticModel, arithmetic_examples
        from engine.metrics import ExactMatch
        from tests.conftest import qa_prompt
        anyio.run(lambda: engine.evaluate(
            qa_prompt(), arithmetic_examples(8), model=ArithmeticModel(), metric=ExactMatch()))
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        print(urllib.request.urlopen(url, timeout=10).read().decode())
        server.shutdown()
        """
    )
    assert out.returncode == 0, out.stderr
    scraped = out.stdout
    assert "gen_ai_client_token_usage" in scraped
    assert "gen_ai_client_operation_duration_seconds" in scraped
    requests = [line for line in scraped.splitlines() if line.startswith("engine_requests_total")]
    assert requests and requests[0].endswith(" 8.0")
    assert 'engine_examples_scored_total{engine_endpoint="scripted"' in scraped


async def test_a_workers_spans_join_the_drivers_trace(telemetry: Telemetry) -> None:
    """The cluster's carrier: the driver injects its context into the job (W3C
    ``traceparent``), a worker's task adopts it, and the worker's ``evaluate`` span is a
    child of the driver's, in the same trace.  (In process: the worker's half runs in a
    fresh task, as a Ray actor call does; `RayCluster` carries ``Job.trace_context``.)"""
    import contextvars

    import anyio

    from engine.tracing import adopt_trace, run_span, trace_carrier

    carriers: list[dict[str, str]] = []
    with instrument(tracer_provider=telemetry.tracer_provider):
        with run_span("evaluate", "driver"):
            carriers.append(trace_carrier())

    async def worker() -> None:
        adopt_trace(carriers[0])
        with instrument(tracer_provider=telemetry.tracer_provider):
            await evaluate(qa_prompt(), echo_examples(3), model=echo_model(), metric=ExactMatch())

    async with anyio.create_task_group() as tg:  # a task of its own, an empty context
        contextvars.Context().run(tg.start_soon, worker)
    assert "traceparent" in carriers[0]
    spans = telemetry.finished()
    driver = next(s for s in spans if (s.attributes or {}).get("engine.endpoint") == "driver")
    mine = [s for s in spans if s is not driver]
    assert {s.context.trace_id for s in mine} == {driver.context.trace_id}
    (worker_root,) = [s for s in mine if s.name == "evaluate"]
    assert worker_root.parent is not None and worker_root.parent.span_id == driver.context.span_id
    assert trace_carrier() == {}  # outside an instrumented run: nothing to carry
