"""The ``lm`` handle a program calls, and the dry pass that checks its calls for free.

``await lm(name, **variables)`` renders prompt ``name`` with the variables and sends it
through that prompt's `Endpoint` (limits, retries, pause gate, breaker) charged to the
run's budget meter, and through the cache.  An inner call is cached by what was sent:
the prompt's request hash (prompt, endpoint identity, response format sent) and the
rendered variables (as the key's example, whose id is their content hash), so a call
whose prompt and variables did not change is a hit whatever else changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .._budget import BudgetMeter
from .._errors import ConfigError, EngineError, ProgramError, ProviderError
from .._events import Emitter
from .._prompt import Prompt, render_value
from .._types import Example, ProgramCall, Usage
from ..cache import Cache, CachedPrediction, request_hash
from ..endpoint import Endpoint
from ..tracing import mark_example
from ._setup import ProgramSetup

__all__ = ["DRY_RUN_MAX_CALLS", "ProgramRunner", "dry_run", "render_call"]

DRY_RUN_MAX_CALLS = 100  # a program looping on placeholder text is stopped here
Paid = Callable[[int, Usage | None], None]  # attempts, usage: the evaluation's tally


def render_call(
    prompts: Mapping[str, Prompt], name: object, variables: Mapping[str, Any]
) -> tuple[Prompt, dict[str, str], list[dict[str, str]]]:
    """The prompt ``name``, the variables as sent, the rendered messages; `ConfigError`
    for an unknown name or a missing (or unused) variable."""
    prompt = prompts.get(name) if isinstance(name, str) else None
    if prompt is None:
        raise ConfigError(
            f"lm({name!r}): the program has no prompt of that name (it has {sorted(prompts)})"
        )
    sent = {key: render_value(value) for key, value in variables.items()}
    try:
        messages = prompt.render(sent)
    except ConfigError as exc:
        raise ConfigError(f"lm({name!r}): {exc.message}") from None
    return prompt, sent, messages


class _DryRunDone(Exception):
    """Raised in a program that made `DRY_RUN_MAX_CALLS` calls during the dry pass."""


async def dry_run(setup: ProgramSetup, example: Example) -> int:
    """Run the program once on ``example`` with an ``lm`` that checks every call (name,
    variables) and answers placeholder text, paying nothing; return the calls made.

    A bad call raises `ConfigError` before any paid call.  Anything else the program
    raises on placeholder text (it may parse it) ends the pass quietly: the calls made
    up to there were checked.  The program's own side effects (tools) do run.
    """
    calls = 0

    async def lm(name: str, /, **variables: Any) -> str:
        nonlocal calls
        render_call(setup.prompts, name, variables)
        calls += 1
        if calls > DRY_RUN_MAX_CALLS:
            raise _DryRunDone
        return f"<{name} output>"

    try:
        await setup.program(lm, example)
    except ConfigError:
        raise
    except Exception:  # placeholder text may break the program's own code
        pass
    return calls


class ProgramRunner:
    """Runs the program on examples of one evaluation, its ``lm`` calls paid once."""

    def __init__(
        self,
        setup: ProgramSetup,
        *,
        cache: Cache | None,
        meter: BudgetMeter | None,
        emitter: Emitter,
        paid: Paid,
    ) -> None:
        self.setup = setup
        self.cache = cache
        self.meter = meter
        self.emitter = emitter
        self.paid = paid

    async def predict(
        self, example: Example, trace: list[ProgramCall]
    ) -> tuple[CachedPrediction, bool]:
        """The program's answer on ``example`` (its usage summed over its calls) and
        whether nothing was paid; every call is appended to ``trace`` as it ends."""
        usage: list[Usage] = []

        async def lm(name: str, /, **variables: Any) -> str:
            prompt, sent, messages = render_call(self.setup.prompts, name, variables)
            try:
                prediction, cached = await self._call(name, prompt, sent, messages)
            except ProviderError as exc:
                trace.append(ProgramCall(name, sent, None, f"{type(exc).__name__}: {exc}"))
                raise
            trace.append(ProgramCall(name, sent, prediction.text, None, cached))
            self.setup.counts.add(name, cached=cached)
            usage.append(prediction.usage)
            return prediction.text

        mark_example(example.id)
        try:
            answer = await self.setup.program(lm, example)
        except EngineError:
            raise  # a provider error, a bad lm call: handled as the engine's own
        except Exception as exc:
            raise ProgramError(
                f"the program raised on example {example.id!r}: {type(exc).__name__}: {exc}"
            ) from exc
        text = answer if isinstance(answer, str) else render_value(answer)
        total = sum(usage, Usage())
        return CachedPrediction(text, total), all(call.cached for call in trace)

    async def _call(
        self, name: str, prompt: Prompt, sent: dict[str, str], messages: list[dict[str, str]]
    ) -> tuple[CachedPrediction, bool]:
        endpoint = self.setup.endpoints[name]
        asked = endpoint.format_sent(prompt.response_format)
        request = _request(prompt, endpoint, asked)

        async def call() -> CachedPrediction:
            try:
                result = await endpoint.complete(
                    messages, prompt.request_params(), events=self.emitter, meter=self.meter
                )
            except ProviderError as exc:
                self.paid(exc.attempts, None)
                raise
            completion = result.completion
            self.paid(result.attempts, completion.usage)
            answered = completion.sent_response_format
            other = _request(prompt, endpoint, answered) if answered is not None else None
            return CachedPrediction(completion.text, completion.usage, other)

        if self.cache is None:
            return await call(), False
        # keyed by what was sent: the variables are the key's example (a content-hash id)
        return await self.cache.prediction(request, Example(inputs=sent), call)


def _request(prompt: Prompt, endpoint: Endpoint, sent: Mapping[str, Any] | None) -> str:
    asked = dict(sent) if sent is not None else None
    return request_hash(prompt.hash, endpoint.cache_identity, asked)
