"""OpenTelemetry spans and metrics of a run, when the host has set OpenTelemetry up.

A library does not configure OpenTelemetry: the host sets a tracer (and meter) provider,
or passes one to `instrument`.  Once per run (`optimize`, or an `evaluate` called on its
own) the engine looks: when ``opentelemetry`` was never imported, or its providers are
still the default proxies, the run is not instrumented and every hook below is one
context-variable lookup.  This module imports nothing of OpenTelemetry itself: it uses
the modules the host already imported (``sys.modules``), so ``import engine`` stays free
of it.

Spans: ``optimize`` > ``step`` > ``proposal`` > ``gradient`` / ``apply`` / ``evaluate`` >
``chat {model}`` (one per provider attempt, named and attributed per the OpenTelemetry
GenAI semantic conventions).  Metrics are recorded per attempt and, from the event
stream (`engine._events.event_tap`), per evaluation and per pause.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from .._context import current_meter
from .._errors import ProviderError
from .._events import Event, event_tap
from .._types import Completion
from ._content import completion_content, prompt_content
from ._instruments import Instruments

__all__ = [
    "attempt_span",
    "current_run",
    "instrument",
    "instrumented",
    "mark_example",
    "run_span",
    "span",
]

T = TypeVar("T")

_SCOPE = "textgrad-engine"
_DEFAULT_PROXIES = {"ProxyTracerProvider", "NoOpTracerProvider"}
_DEFAULT_METER_PROXIES = {"_ProxyMeterProvider", "NoOpMeterProvider"}
_NOTHING: AbstractContextManager[None] = nullcontext()


@dataclass(frozen=True, slots=True)
class _Config:
    tracer_provider: Any = None
    meter_provider: Any = None
    capture_content: bool = False


_config: ContextVar[_Config | None] = ContextVar("engine_otel_config", default=None)
_active: ContextVar[_Run | None] = ContextVar("engine_otel_run", default=None)
_example: ContextVar[str | None] = ContextVar("engine_otel_example", default=None)


@contextmanager
def instrument(
    *,
    tracer_provider: Any = None,
    meter_provider: Any = None,
    capture_content: bool = False,
) -> Iterator[None]:
    """Runs started inside the block use these providers and this content policy.

    Parameters:
        tracer_provider, meter_provider: OpenTelemetry providers; ``None`` means the
            global ones (``opentelemetry.trace.set_tracer_provider``), used only when
            the host has set them.
        capture_content: record prompt and completion text on the attempt spans
            (``gen_ai.input.messages``, ``gen_ai.output.messages``), redacted as
            events are.  Off by default: no text of a prompt or an answer reaches a span.
    """
    token = _config.set(_Config(tracer_provider, meter_provider, capture_content))
    try:
        yield
    finally:
        _config.reset(token)


def _tracer(explicit: Any) -> Any:
    if explicit is not None:
        return explicit.get_tracer(_SCOPE)
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:  # never imported: nobody can have set a provider
        return None
    provider = trace.get_tracer_provider()
    if type(provider).__name__ in _DEFAULT_PROXIES:
        return None
    return provider.get_tracer(_SCOPE)


def _meter(explicit: Any) -> Any:
    provider = explicit
    if provider is None:
        metrics = sys.modules.get("opentelemetry.metrics")
        if metrics is None:
            return None
        provider = metrics.get_meter_provider()
        if type(provider).__name__ in _DEFAULT_METER_PROXIES:
            return None
    return provider.get_meter(_SCOPE)


class _Run:
    """One instrumented run: its tracer, its instruments, its content policy."""

    __slots__ = ("capture_content", "instruments", "prices", "trace", "tracer")

    def __init__(self, tracer: Any, meter: Any, capture_content: bool) -> None:
        self.tracer = tracer
        self.instruments = Instruments(meter) if meter is not None else None
        self.capture_content = capture_content
        self.trace = sys.modules.get("opentelemetry.trace")
        self.prices: dict[str, Any] = {}

    def span(self, name: str, attributes: Mapping[str, Any]) -> AbstractContextManager[Any]:
        if self.tracer is None:
            return _NOTHING
        return self._span(name, attributes)

    @contextmanager
    def _span(self, name: str, attributes: Mapping[str, Any]) -> Iterator[Any]:
        # Neither the exception nor its message is recorded (OpenTelemetry's default):
        # a provider's error body, or a metric's exception, may quote prompt text.
        with self.tracer.start_as_current_span(
            name,
            attributes=_clean(attributes),
            record_exception=False,
            set_status_on_exception=False,
        ) as current:
            try:
                yield current
            except BaseException as exc:
                if current.is_recording() and self.trace is not None:
                    kind = type(exc).__qualname__
                    current.set_attribute("error.type", kind)
                    current.set_status(self.trace.Status(self.trace.StatusCode.ERROR, kind))
                raise

    def current_span(self) -> Any:
        return self.trace.get_current_span() if self.trace is not None else None

    def on_event(self, endpoint: str | None, event: Event) -> None:
        """Spans and metrics from the run's event stream (redacted payloads)."""
        data, span = event.data, self.current_span()
        if event.name == "evaluation.finished":
            if span is not None:
                span.set_attributes(_clean(_finished_attributes(data)))
            if self.instruments is not None:
                self.instruments.evaluation(endpoint, data)
        elif event.name == "endpoint.paused":
            if span is not None:
                span.add_event("engine.pause", {"engine.pause.seconds": data.get("seconds", 0.0)})
            if self.instruments is not None:
                self.instruments.pause(str(data.get("endpoint")))
        elif event.name in ("optimize.step", "optimize.finished") and span is not None:
            prefix = "engine.step." if event.name == "optimize.step" else "engine.optimize."
            span.set_attributes(
                _clean({prefix + k: v for k, v in data.items() if k not in ("run", "prompt")})
            )
        elif event.name == "optimize.accepted" and span is not None:
            span.add_event("engine.accepted", _clean(dict(data)))

    def cost(self, model: str, completion: Completion) -> float | None:
        meter = current_meter.get()
        if meter is None:
            return None
        price = self.prices.get(model)
        if price is None:
            price = self.prices[model] = meter.budget.price_table().get(model)
        return None if price is None else float(price.cost(completion.usage))


def _finished_attributes(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "engine.examples.completed": data.get("done"),
        "engine.examples.total": data.get("total"),
        "engine.examples.errored": data.get("errors"),
        "engine.cache_hits": data.get("cache_hits"),
        "engine.calls": data.get("calls"),
        "engine.score": data.get("score"),
        "engine.conservative_score": data.get("conservative_score"),
        "engine.stopped_early": data.get("stopped_early"),
    }


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float (and sequences of them), never None."""
    clean: dict[str, Any] = {}
    for key, value in attributes.items():
        if isinstance(value, str | bool | int | float):
            clean[key] = value
        elif value is not None:
            clean[key] = str(value)
    return clean


def _resolve() -> _Run | None:
    config = _config.get() or _Config()
    tracer = _tracer(config.tracer_provider)
    meter = _meter(config.meter_provider)
    if tracer is None and meter is None:
        return None
    return _Run(tracer, meter, config.capture_content)


def current_run() -> _Run | None:
    """The instrumented run this code runs in, if any."""
    return _active.get()


def instrumented() -> bool:
    """Whether this code runs inside an instrumented run (cheaper than a clock read)."""
    return _active.get() is not None


@contextmanager
def run_span(name: str, endpoint: str | None = None, **attributes: Any) -> Iterator[None]:
    """The span of a run (``optimize``, ``evaluate``): decides once whether the run is
    instrumented (an evaluation inside an instrumented optimization reuses its run),
    and lends the run's event listener to everything started inside."""
    run = _active.get()
    fresh = run is None
    if run is None:
        run = _resolve()
        if run is None:
            yield  # not instrumented: nothing set, nothing recorded
            return
    run_token = _active.set(run) if fresh else None
    tap_token = event_tap.set(functools.partial(run.on_event, endpoint))
    try:
        with run.span(name, {"engine.endpoint": endpoint, **attributes}):
            yield
    finally:
        event_tap.reset(tap_token)
        if run_token is not None:
            _active.reset(run_token)


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A span inside an instrumented run; nothing otherwise."""
    run = _active.get()
    if run is None:
        return _NOTHING
    return run.span(name, attributes)


def mark_example(example_id: str) -> None:
    """The example the calls made from here on are for (``engine.example.id``)."""
    if _active.get() is not None:
        _example.set(example_id)


def attempt_span(
    attempt: Coroutine[Any, Any, T],
    endpoint: Any,
    messages: Sequence[Mapping[str, str]],
    params: Mapping[str, Any],
    number: int,
    queued: float,
) -> Coroutine[Any, Any, T]:
    """``attempt`` itself when the run is not instrumented, else ``attempt`` inside a
    ``chat {model}`` span that records its outcome and its metrics."""
    run = _active.get()
    if run is None:
        return attempt
    return _traced_attempt(run, attempt, endpoint, messages, params, number, queued)


async def _traced_attempt(
    run: _Run,
    attempt: Coroutine[Any, Any, T],
    endpoint: Any,
    messages: Sequence[Mapping[str, str]],
    params: Mapping[str, Any],
    number: int,
    queued: float,
) -> T:
    model = str(params.get("model", endpoint.name))
    common = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider_name(endpoint.model),
        "gen_ai.request.model": model,
        "engine.endpoint": endpoint.name,
    }
    attributes = {
        **common,
        "engine.retry.attempt": number,
        "engine.pause.waited_s": max(0.0, endpoint._clock() - queued),
        "engine.cache_hit": False,  # an attempt is made only on a miss
        "engine.example.id": _example.get(),
    }
    if run.capture_content:
        attributes["gen_ai.input.messages"] = prompt_content(messages)
    started = time.perf_counter()
    error: BaseException | None = None
    with run.span(f"chat {model}", attributes) as current:
        try:
            answer = await attempt
        except BaseException as exc:
            error = exc
            _error_attributes(current, exc)
            raise
        finally:
            if run.instruments is not None:
                run.instruments.attempt(common, time.perf_counter() - started, error)
        if isinstance(answer, Completion):
            _on_answer(run, current, common, model, answer)
    return answer


def _error_attributes(current: Any, exc: BaseException) -> None:
    """The failed attempt's HTTP status (its ``error.type``, the error class, is set as
    the span ends); never its message (a provider's error body may echo the prompt)."""
    status = exc.status if isinstance(exc, ProviderError) else None
    if current is not None and status is not None:
        current.set_attribute("http.response.status_code", status)


def _on_answer(
    run: _Run, current: Any, common: Mapping[str, Any], model: str, answer: Completion
) -> None:
    usage = answer.usage
    if current is not None:
        current.set_attributes(
            _clean(
                {
                    "gen_ai.response.model": answer.model or model,
                    "gen_ai.usage.input_tokens": usage.prompt_tokens,
                    "gen_ai.usage.output_tokens": usage.completion_tokens,
                    "gen_ai.response.finish_reasons": answer.finish_reason,
                }
            )
        )
        if run.capture_content:
            current.set_attribute("gen_ai.output.messages", completion_content(answer))
    if run.instruments is not None:
        run.instruments.answer(common, usage, run.cost(model, answer))


def provider_name(model: Any) -> str:
    """``gen_ai.provider.name``: the adapter's ``provider_name``, else read from its
    cache identity (``openai-chat:...`` is OpenAI, ``openai-chat:azure:...`` Azure)."""
    named = getattr(model, "provider_name", None)
    if isinstance(named, str) and named:
        return named
    identity = str(getattr(model, "cache_identity", "") or "")
    if identity.startswith("openai-chat:azure:"):
        return "azure.ai.openai"
    if identity.startswith("openai-chat:"):
        return "openai"
    head = identity.split(":", 1)[0]
    return head or type(model).__name__.lower()
