"""Benchmark your own endpoint: the rate, latency and cost a run will really get.

``textgrad bench RUN.toml`` (or `bench_endpoint` from code) sweeps a few concurrency
levels against the run file's endpoint, sending the run's real prompt over its real
rows (cycling the dataset) or a synthetic load, through the same `Endpoint` path as
`evaluate`: the run's limits, retry policy and pause gate.  Per level it measures
requests and tokens per second, the limits the endpoint announces and the fraction of
them reached, the 429 share and Retry-After, latency percentiles, errors by class and
cost; then it projects the whole dataset and recommends the ``[model.limits]`` to use::

    report = await bench_endpoint(chat, prompt, rows, settings=BenchSettings(
        concurrency=(8, 32, 128), requests=200, max_requests=1000))
    print(report.to_table())
    print(report.recommendation.to_toml())

Hard caps (``max_requests``, ``max_cost``) count every attempt, retries included, and
are checked right before each attempt leaves: they are never exceeded.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from ._bench_html import render_bench_html
from ._bench_record import Attempt, RecordingModel, RequestCaps, completion_cap, worst_case_usage
from ._bench_stats import LevelResult, TimelineBucket, percentile, summarize_level
from ._budget import Price
from ._endpoint import Endpoint, estimate_tokens
from ._errors import BudgetExceededError, ConfigError, ProviderError
from ._evaluate import validate_examples
from ._limits import Limits
from ._prompt import Prompt
from ._protocols import ChatModel
from ._retry import RetryPolicy
from ._types import Example, Usage

__all__ = [
    "Attempt",
    "BenchProgress",
    "BenchReport",
    "BenchSettings",
    "LevelResult",
    "Projection",
    "Recommendation",
    "RecordingModel",
    "RequestCaps",
    "TimelineBucket",
    "bench_endpoint",
    "best_level",
    "format_table",
    "percentile",
    "plan_bench",
    "recommend",
]

# A level within this fraction of the best rate counts as reaching it (the knee).
_NEAR_BEST = 0.95
# Stop the sweep when this many requests failed before any was answered.
_DEAD_AFTER = 10
# Fewer answers than this per slot and a level hardly leaves its ramp-up.
_STEADY_PER_SLOT = 4
# Completion tokens assumed per request when nothing caps them (dry-run estimate only).
_UNCAPPED_COMPLETION = 256


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


@dataclass(frozen=True, slots=True)
class Projection:
    """Wall time and cost of ``examples`` requests at the best level's rate."""

    examples: int
    concurrency: int
    requests_per_s: float
    wall_s: float
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class Recommendation:
    """The ``[model.limits]`` to put in the run file, with the reasons."""

    concurrency: int | None
    rpm: float | None
    tpm: float | None
    limit_found: bool
    notes: tuple[str, ...]

    def to_toml(self) -> str:
        """TOML lines to paste into the run file (the notes as comments)."""
        lines = [f"# {note}" for note in self.notes]
        if self.concurrency is None:
            return "\n".join(lines)
        lines += ["[model.limits]", f"concurrency = {self.concurrency}"]
        lines += [
            f"{key} = {_toml_number(v)}" for key, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v
        ]
        return "\n".join(lines)


def _toml_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True, slots=True)
class BenchReport:
    """The whole sweep: the levels, the best one, the projection, the recommendation.

    ``cost_usd`` is what the sweep spent by the price table (an attempt that may have
    been billed without an answer counts at its worst case when a cost cap is set);
    ``stopped`` says why the sweep ended early (a cap, a failing endpoint), if it did.
    """

    endpoint: str
    model: str
    settings: BenchSettings
    configured: Limits | None
    levels: tuple[LevelResult, ...]
    attempts: int
    cost_usd: float | None
    stopped: str | None
    synthetic: bool
    dataset_examples: int
    best: LevelResult | None
    projection: Projection | None
    recommendation: Recommendation

    @property
    def answered(self) -> int:
        return sum(level.requests for level in self.levels)

    def to_dict(self) -> dict[str, Any]:
        configured = self.configured
        return {
            "endpoint": self.endpoint,
            "model": self.model,
            "settings": asdict(self.settings),
            "configured_limits": asdict(configured) if configured is not None else None,
            "synthetic": self.synthetic,
            "dataset_examples": self.dataset_examples,
            "attempts": self.attempts,
            "cost_usd": self.cost_usd,
            "stopped": self.stopped,
            "levels": [level.to_dict() for level in self.levels],
            "best_concurrency": self.best.concurrency if self.best is not None else None,
            "projection": asdict(self.projection) if self.projection is not None else None,
            "recommendation": {
                **asdict(self.recommendation),
                "toml": self.recommendation.to_toml(),
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_table(self) -> str:
        return format_table(self)

    def to_html(self) -> str:
        """One self-contained page: the table, and per level the throughput and
        latency over time with the announced limit drawn as a line (inline SVG)."""
        return render_bench_html(self)


class _Requests:
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


class _Sweep:
    """Runs the levels one after the other against one recorded adapter."""

    def __init__(
        self,
        recorder: RecordingModel,
        source: _Requests,
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
        self.fatal: ProviderError | None = None
        self.stopped: str | None = None

    async def run(self) -> list[LevelResult]:
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


def best_level(levels: Sequence[LevelResult]) -> LevelResult | None:
    """The smallest concurrency within 5% of the highest rate measured: slots past it
    buy nothing.  ``None`` when no level answered anything."""
    measured = [lv for lv in levels if lv.requests_per_s]
    if not measured:
        return None
    top = max(lv.requests_per_s or 0.0 for lv in measured)
    near = [lv for lv in measured if (lv.requests_per_s or 0.0) >= _NEAR_BEST * top]
    return min(near, key=lambda lv: lv.concurrency)


def recommend(levels: Sequence[LevelResult], configured: Limits | None = None) -> Recommendation:
    """The concurrency and rates to configure, from a sweep's levels.

    Concurrency: the `best_level`.  Rates: the limits the endpoint announced; else,
    when it sent 429s, 95% of the best rate it sustained; else none (no limit was
    found up to the highest level tried).
    """
    best = best_level(levels)
    if best is None:
        return Recommendation(
            None, None, None, False, ("no request was answered: nothing to recommend",)
        )
    top_rate = max(lv.requests_per_s or 0.0 for lv in levels)
    notes = [
        f"concurrency {best.concurrency}: the smallest level within 5% of the highest rate "
        f"measured ({top_rate:.1f} requests/s)"
    ]
    rpm = next(
        (lv.limit_requests_per_min for lv in reversed(levels) if lv.limit_requests_per_min), None
    )
    tpm = next(
        (lv.limit_tokens_per_min for lv in reversed(levels) if lv.limit_tokens_per_min), None
    )
    if rpm is not None or tpm is not None:
        notes.append("rates: the limits the endpoint announces (x-ratelimit-limit-*)")
        notes += _binding_notes(best, rpm, tpm) + _configured_notes(configured, rpm, tpm)
        return Recommendation(best.concurrency, rpm, tpm, True, tuple(notes))
    if any(lv.share_429 > 0 for lv in levels):
        sustained = math.floor(top_rate * 60 * _NEAR_BEST)
        notes.append(
            f"the endpoint announces no limits but sent 429s: rpm {sustained} is 95% of "
            "the highest rate it sustained"
        )
        return Recommendation(best.concurrency, sustained, None, True, tuple(notes))
    return _no_limit_found(levels, best, configured, notes)


def _no_limit_found(
    levels: Sequence[LevelResult],
    best: LevelResult,
    configured: Limits | None,
    notes: list[str],
) -> Recommendation:
    top = max(lv.concurrency for lv in levels)
    notes.append(
        f"no limit was found up to concurrency {top}: the endpoint announced none and sent no 429"
    )
    if best.concurrency == top and len(levels) > 1:
        notes.append(f"the rate was still rising at concurrency {top}: try higher levels")
    if configured is not None and (configured.rpm or configured.tpm):
        notes.append("the run file's own rpm/tpm may have held the sweep back; they are kept")
        return Recommendation(best.concurrency, configured.rpm, configured.tpm, False, tuple(notes))
    return Recommendation(best.concurrency, None, None, False, tuple(notes))


def _binding_notes(best: LevelResult, rpm: int | None, tpm: int | None) -> list[str]:
    """Which announced limit a run of this request size meets first."""
    per_request = (best.prompt_tokens_mean or 0.0) + (best.completion_tokens_mean or 0.0)
    if tpm is None or per_request <= 0:
        return []
    by_tokens = tpm / per_request
    if rpm is not None and by_tokens >= rpm:
        return [f"the request limit binds: {tpm:,} tokens/min allow {by_tokens:,.0f} requests/min"]
    return [
        f"the token limit binds: {tpm:,} tokens/min at {per_request:,.0f} tokens per request "
        f"allow {by_tokens:,.0f} requests/min"
    ]


def _configured_notes(configured: Limits | None, rpm: int | None, tpm: int | None) -> list[str]:
    if configured is None or (configured.rpm is None and configured.tpm is None):
        return ["set here they hold as given; learned from headers, the engine keeps a margin"]
    notes = []
    for name, mine, theirs in (("rpm", configured.rpm, rpm), ("tpm", configured.tpm, tpm)):
        if mine is not None and theirs is not None and mine < theirs:
            notes.append(
                f"the run file's {name} = {mine:g} held the sweep below the {theirs}/min allowed"
            )
    return notes


def _projection(
    levels: Sequence[LevelResult], best: LevelResult | None, examples: int, price: Price | None
) -> Projection | None:
    if best is None or not best.requests_per_s:
        return None
    answered = sum(lv.requests for lv in levels)
    spent = [lv.cost_usd for lv in levels if lv.cost_usd is not None]
    per_request = sum(spent) / answered if price is not None and answered else None
    return Projection(
        examples=examples,
        concurrency=best.concurrency,
        requests_per_s=best.requests_per_s,
        wall_s=examples / best.requests_per_s,
        cost_usd=per_request * examples if per_request is not None else None,
    )


async def bench_endpoint(
    model: ChatModel,
    prompt: Prompt,
    rows: Sequence[Example],
    *,
    settings: BenchSettings | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
    on_progress: Callable[[BenchProgress], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BenchReport:
    """Sweep ``settings.concurrency`` against ``model`` and measure each level.

    ``limits`` are the run's (its rpm, tpm and burst hold at every level; the level
    replaces its concurrency); ``retry`` the run's policy; ``price`` the model's
    price, for costs and ``max_cost``.  Raises `ConfigError` for bad input before any
    call, and a fatal `ProviderError` (bad credentials, exhausted quota) at once.
    """
    settings = settings or BenchSettings()
    validate_examples(prompt, rows)
    source = _Requests(prompt, rows, settings)
    if settings.max_cost is not None:
        worst_case_usage(source.messages(0), source.params)  # a cost cap needs a max_tokens
    caps = RequestCaps(max_requests=settings.max_requests, max_cost=settings.max_cost, price=price)
    recorder = RecordingModel(model, caps=caps, clock=clock)
    sweep = _Sweep(
        recorder,
        source,
        settings,
        limits=limits,
        retry=retry,
        price=price,
        on_progress=on_progress,
        clock=clock,
    )
    levels = tuple(await sweep.run())
    best = best_level(levels)
    examples = settings.project_examples or len(rows)
    return BenchReport(
        endpoint=recorder.name,
        model=prompt.model,
        settings=settings,
        configured=limits,
        levels=levels,
        attempts=caps.attempts,
        cost_usd=caps.spent if price is not None else None,
        stopped=sweep.stopped,
        synthetic=settings.prompt_tokens is not None,
        dataset_examples=len(rows),
        best=best,
        projection=_projection(levels, best, examples, price),
        recommendation=recommend(levels, limits),
    )


def plan_bench(
    prompt: Prompt,
    rows: Sequence[Example],
    *,
    settings: BenchSettings | None = None,
    limits: Limits | None = None,
    retry: RetryPolicy | None = None,
    price: Price | None = None,
) -> dict[str, Any]:
    """The dry run: upper bounds of the attempts and the cost of a sweep, no call made.

    Attempts are bounded by the requests times the retry policy's attempts, by the
    configured rpm over a ``duration``, and by ``max_requests``; the cost by the worst
    case of every request that may be sent (bytes as tokens, the completion cap) and
    by ``max_cost``.  The expected cost uses the 4-characters rule and the cap.
    """
    settings = settings or BenchSettings()
    validate_examples(prompt, rows)
    source = _Requests(prompt, rows, settings)
    attempts = _attempt_bound(settings, limits, retry or RetryPolicy())
    distinct = 1 if source.synthetic is not None else len(rows)
    samples = [source.messages(i) for i in range(min(attempts or distinct, distinct))]
    cap = completion_cap(source.params)
    completion = cap or _UNCAPPED_COMPLETION
    prompt_tokens = max(estimate_tokens(m, 0) for m in samples)
    worst: float | None = None
    if settings.max_cost is not None or (price is not None and cap is not None):
        worst_usage = [worst_case_usage(m, source.params) for m in samples]  # needs a cap
        worst = max(price.cost(u) for u in worst_usage) if price is not None else None
    bound = worst * attempts if worst is not None and attempts is not None else None
    if settings.max_cost is not None:
        bound = settings.max_cost if bound is None else min(bound, settings.max_cost)
    planned = settings.requests * len(settings.concurrency) if settings.duration is None else None
    expected = (
        price.cost(Usage(prompt_tokens, completion)) * planned
        if price is not None and planned is not None
        else None
    )
    return {
        "command": "bench",
        "levels": list(settings.concurrency),
        "requests_per_level": settings.requests if settings.duration is None else None,
        "duration_s": settings.duration,
        "planned_requests": planned,
        "max_attempts": attempts,
        "tokens_per_request_estimate": prompt_tokens + completion,
        "cost_per_request_upper_bound_usd": worst,
        "max_cost_usd": bound,
        "expected_cost_usd": expected,
        "note": "max_attempts counts every retry; null means unbounded (pass --max-requests)",
    }


def _attempt_bound(
    settings: BenchSettings, limits: Limits | None, retry: RetryPolicy
) -> int | None:
    levels = len(settings.concurrency)
    bound: int | None = None
    if settings.duration is None:
        bound = settings.requests * levels * retry.max_attempts
    elif limits is not None and limits.rpm is not None:
        # every attempt takes a request from the bucket: rate x time + one burst
        per_level = settings.duration * limits.rpm / 60.0 + limits.request_burst(limits.rpm)
        bound = math.ceil(per_level) * levels
    if settings.max_requests is not None:
        bound = settings.max_requests if bound is None else min(bound, settings.max_requests)
    return bound


def _cell(value: float | None, spec: str, unknown: str = "-") -> str:
    return unknown if value is None else format(value, spec)


def format_table(report: BenchReport) -> str:
    """The sweep as a fixed-width text table, then the best level and the projection."""
    head = (
        f"{'conc':>5} {'requests':>8} {'req/s':>7} {'tok/s':>8} {'RPM limit':>9} {'of RPM':>6} "
        f"{'TPM limit':>9} {'of TPM':>6} {'429s':>6} {'retry-after':>11} {'p50 s':>6} "
        f"{'p95 s':>6} {'p99 s':>6} {'max s':>6} {'errors':>6} {'$/1k ex':>8}"
    )
    lines = [f"endpoint {report.endpoint}, model {report.model}", head]
    for lv in report.levels:
        errors = sum(n for name, n in lv.errors.items() if name != "RateLimitedError")
        lines.append(
            f"{lv.concurrency:>5} {lv.requests:>8} {_cell(lv.requests_per_s, '7.1f'):>7} "
            f"{_cell(lv.tokens_per_s, '8.0f'):>8} "
            f"{_cell(lv.limit_requests_per_min, 'd', 'unknown'):>9} "
            f"{_cell(lv.fraction_of_request_limit, '6.2f'):>6} "
            f"{_cell(lv.limit_tokens_per_min, 'd', 'unknown'):>9} "
            f"{_cell(lv.fraction_of_token_limit, '6.2f'):>6} {lv.share_429:>6.1%} "
            f"{_cell(lv.retry_after_max_s, '.1f'):>11} {_cell(lv.p50_s, '6.3f'):>6} "
            f"{_cell(lv.p95_s, '6.3f'):>6} {_cell(lv.p99_s, '6.3f'):>6} "
            f"{_cell(lv.max_s, '6.3f'):>6} {errors:>6} {_cell(lv.cost_per_1000_usd, '8.4f'):>8}"
        )
    lines += _summary_lines(report)
    return "\n".join(lines)


def _summary_lines(report: BenchReport) -> list[str]:
    lines = []
    for lv in report.levels:
        if lv.requests < _STEADY_PER_SLOT * lv.concurrency:
            lines.append(
                f"concurrency {lv.concurrency}: {lv.requests} answers are few for "
                f"{lv.concurrency} in flight; its rate may be ramp-dominated (use --requests "
                f"{_STEADY_PER_SLOT * lv.concurrency} or more)"
            )
        other = {k: v for k, v in lv.errors.items() if k != "RateLimitedError"}
        if other:
            detail = ", ".join(f"{name} x{n}" for name, n in sorted(other.items()))
            lines.append(f"errors at concurrency {lv.concurrency}: {detail}")
    if report.stopped:
        lines.append(f"stopped early: {report.stopped}")
    best, projection = report.best, report.projection
    if best is not None and best.requests_per_s is not None:
        reached = [
            f"{fraction:.2f} of the announced {limit:,} {unit}/min"
            for fraction, limit, unit in (
                (best.fraction_of_request_limit, best.limit_requests_per_min, "requests"),
                (best.fraction_of_token_limit, best.limit_tokens_per_min, "tokens"),
            )
            if fraction is not None and limit is not None
        ]
        of_limits = "; ".join(reached) or "the endpoint announced no limit"
        lines.append(
            f"best: concurrency {best.concurrency}, {best.requests_per_s:.1f} requests/s "
            f"({of_limits})"
        )
    if projection is not None:
        cost = (
            f", ${projection.cost_usd:,.2f}"
            if projection.cost_usd is not None
            else ", cost unknown (no price)"
        )
        lines.append(
            f"projection for {projection.examples:,} examples at concurrency "
            f"{projection.concurrency}: {_duration(projection.wall_s)}{cost}"
        )
    spent = f"${report.cost_usd:.4f}" if report.cost_usd is not None else "cost unknown (no price)"
    lines.append(f"this sweep: {report.attempts} requests sent, {spent}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
