"""The sweep behind `engine.bench`: one level after the other, each through a fresh
`Endpoint` around one `RecordingModel`.

Each level gets its own `Endpoint` (the run's rpm, tpm, burst and retry policy; the
level's concurrency), as a new run would.  Workers take requests until the level's
count or time is used up, a cap refuses, a fatal error arrives, or the endpoint looks
dead.  Between levels the sweep waits (at most ``cooldown``) for the endpoint's
announced windows to refill, so a level does not pay for the one before.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._budget import Price
from .._errors import BudgetExceededError, ConfigError, ProviderError
from .._prompt import Prompt
from .._types import Example
from ..endpoint import Endpoint, Limits, RetryPolicy
from ._record import Attempt, RecordingModel
from ._stats import LevelResult, summarize_level

__all__ = ["BenchProgress", "BenchSettings", "RequestSource", "Sweep"]

# Stop the sweep when this many requests failed before any was answered.
_DEAD_AFTER = 10


@dataclass(frozen=True, kw_only=True, slots=True)
class BenchSettings:
    """What to sweep and the caps that bound it.

    Parameters:
        concurrency: the levels, in order (each gets a fresh `Endpoint`).
        requests: requests per level (answered or failed); ignored with ``duration``.
        duration: seconds per level instead of a request count.
        max_requests: hard cap on attempts over the whole sweep, retries included.
        max_cost: hard cap in US dollars (needs a price and a ``max_tokens``).
        prompt_tokens: send a synthetic prompt of about this many tokens instead of the
            run's prompt (for sizing).
        max_tokens: the completion cap to send (overrides the prompt's).
        project_examples: examples to project wall time and cost for (default: the
            dataset's size).
        cooldown: longest wait between levels for the endpoint's limits to reset.
    """

    concurrency: tuple[int, ...] = (8, 32, 128)
    requests: int = 200
    duration: float | None = None
    max_requests: int | None = None
    max_cost: float | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None
    project_examples: int | None = None
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        levels = tuple(self.concurrency)
        object.__setattr__(self, "concurrency", levels)
        if not levels or any(not isinstance(c, int) or c < 1 for c in levels):
            raise ConfigError(f"concurrency levels must be positive integers, got {levels!r}")
        for name in ("requests", "max_requests", "prompt_tokens", "max_tokens", "project_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("duration", "max_cost"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be positive, got {value!r}")
        if self.cooldown < 0:
            raise ConfigError("cooldown must not be negative")


@dataclass(frozen=True, slots=True)
class BenchProgress:
    """A progress report: one per second during a level, and one when it ends
    (``result`` set)."""

    level: int
    levels: int
    concurrency: int
    answered: int
    failed: int
    planned: int | None
    attempts: int
    rate_limited: int
    elapsed: float
    result: LevelResult | None = None


class RequestSource:
    """The request for the i-th call: the run's prompt over row ``i mod N``, or a
    synthetic prompt of about ``prompt_tokens`` tokens."""

    def __init__(self, prompt: Prompt, rows: Sequence[Example], settings: BenchSettings) -> None:
        self.prompt = prompt
        self.rows = rows
        self.synthetic = settings.prompt_tokens
        params: dict[str, Any] = {"model": prompt.model, **prompt.params}
        if prompt.response_format is not None and self.synthetic is None:
            params["response_format"] = dict(prompt.response_format)
        if settings.max_tokens is not None:  # under the name the prompt already uses
            key = "max_completion_tokens" if "max_completion_tokens" in params else "max_tokens"
            params[key] = settings.max_tokens
        self.params: Mapping[str, Any] = params

    def messages(self, i: int) -> list[dict[str, str]]:
        """The messages of request ``i`` (``params`` are the same for every request)."""
        if self.synthetic is None:
            return self.prompt.render(self.rows[i % len(self.rows)].inputs)
        # a distinct first line per request: no provider-side prompt cache hits
        head = f"[{i}] Summarize the following text in your own words.\n"
        filler = "lorem ipsum dolor sit amet consectetur " * (self.synthetic // 9 + 1)
        return [{"role": "user", "content": (head + filler)[: 4 * self.synthetic]}]


class _LevelState:
    """Counters of the level being run (the workers share it)."""

    def __init__(self, concurrency: int, planned: int | None, deadline: float | None) -> None:
        self.concurrency = concurrency
        self.planned = planned
        self.deadline = deadline
        self.issued = self.answered = self.failed = 0
        self.stopped: str | None = None

    def take(self, now: float) -> bool:
        """Whether a worker may start one more request."""
        if self.stopped is not None:
            return False
        if self.planned is not None and self.issued >= self.planned:
            return False
        if self.deadline is not None and now >= self.deadline:
            return False
        self.issued += 1
        return True


class Sweep:
    """Runs the levels one after the other against one recorded adapter."""

    def __init__(
        self,
        recorder: RecordingModel,
        source: RequestSource,
        settings: BenchSettings,
        *,
        limits: Limits | None,
        retry: RetryPolicy | None,
        price: Price | None,
        on_progress: Callable[[BenchProgress], None] | None,
        clock: Callable[[], float],
    ) -> None:
        self.recorder = recorder
        self.source = source
        self.settings = settings
        self.limits = limits or Limits()
        self.retry = retry
        self.price = price
        self.on_progress = on_progress
        self.clock = clock
        self.counter = itertools.count()  # request index across levels: rows keep cycling
        self.answered = self.failed = 0
        self.fatal: Exception | None = None  # raised once the sweep has stopped
        self.stopped: str | None = None

    async def run(self) -> list[LevelResult]:
        """Every level in order; stops early on a cap, a fatal error (re-raised once the
        levels' attempts are recorded) or an endpoint that answers nothing."""
        results: list[LevelResult] = []
        for index, concurrency in enumerate(self.settings.concurrency):
            if self.stopped is not None:
                break
            if results:
                await self._cool_down(self.recorder.attempts)
            results.append(await self._level(index, concurrency))
        self.recorder.recording = False
        if self.fatal is not None:
            raise self.fatal
        return results

    async def _level(self, index: int, concurrency: int) -> LevelResult:
        s = self.settings
        endpoint = Endpoint(
            self.recorder,
            limits=Limits(
                rpm=self.limits.rpm,
                tpm=self.limits.tpm,
                burst=self.limits.burst,
                concurrency=concurrency,
                adaptive_concurrency=False,  # the sweep measures each level as given
            ),
            retry=self.retry,
            name=self.recorder.name,
        )
        started = self.clock()
        planned = s.requests if s.duration is None else None
        state = _LevelState(concurrency, planned, started + s.duration if s.duration else None)
        self.recorder.level = index
        first = len(self.recorder.attempts)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._report_progress, index, state, started, first)
            async with anyio.create_task_group() as workers:
                for _ in range(min(concurrency, planned or concurrency)):
                    workers.start_soon(self._worker, endpoint, state)
            tg.cancel_scope.cancel()
        self.stopped = self.stopped or state.stopped
        result = summarize_level(
            self.recorder.attempts[first:],
            concurrency=concurrency,
            planned=planned,
            answered=state.answered,
            failed=state.failed,
            started=started,
            ended=self.clock(),
            price=self.price,
            stopped=state.stopped,
        )
        self._progress(index, state, started, first, result)
        return result

    async def _worker(self, endpoint: Endpoint, state: _LevelState) -> None:
        while state.take(self.clock()):
            i = next(self.counter)
            try:
                await endpoint.complete(self.source.messages(i), self.source.params)
            except BudgetExceededError as exc:  # a hard cap: stop issuing, here and after
                state.stopped = state.stopped or str(exc)
            except ProviderError as exc:
                state.failed += 1
                self.failed += 1
                if exc.fatal:
                    self.fatal = self.fatal or exc
                    state.stopped = f"{type(exc).__name__}: {exc}"
                elif self.answered == 0 and self.failed >= _DEAD_AFTER:
                    state.stopped = (
                        f"the first {self.failed} requests all failed "
                        f"(last: {type(exc).__name__}: {exc})"
                    )
            except Exception as exc:  # an adapter's bug: stop, and raise it after the sweep
                self.fatal = self.fatal or exc
                state.stopped = f"{type(exc).__name__}: {exc}"
            else:
                state.answered += 1
                self.answered += 1

    async def _report_progress(
        self, index: int, state: _LevelState, started: float, first: int
    ) -> None:
        while True:
            await anyio.sleep(1.0)
            self._progress(index, state, started, first, None)

    def _progress(
        self,
        index: int,
        state: _LevelState,
        started: float,
        first: int,
        result: LevelResult | None,
    ) -> None:
        if self.on_progress is None:
            return
        attempts = self.recorder.attempts[first:]
        self.on_progress(
            BenchProgress(
                level=index,
                levels=len(self.settings.concurrency),
                concurrency=state.concurrency,
                answered=state.answered,
                failed=state.failed,
                planned=state.planned,
                attempts=len(attempts),
                rate_limited=sum(a.error == "RateLimitedError" for a in attempts),
                elapsed=self.clock() - started,
                result=result,
            )
        )

    async def _cool_down(self, attempts: Sequence[Attempt]) -> None:
        """Let the endpoint's windows refill, so a level does not pay for the last."""
        waits = [0.0]
        now = self.clock()
        for attempt in reversed(attempts):
            if attempt.retry_after is not None:
                waits.append(attempt.retry_after - (now - attempt.end))
            if attempt.rate_limits is not None:
                resets = (attempt.rate_limits.reset_requests, attempt.rate_limits.reset_tokens)
                waits += [r - (now - attempt.end) for r in resets if r]
                break  # the latest headers say how full the windows are now
        await anyio.sleep(min(max(waits), self.settings.cooldown))
