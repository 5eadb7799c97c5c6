"""Limits: counted at the scripted provider, not inside the engine."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from adapters import (
    ArithmeticCoach,
    ArithmeticModel,
    OpenAIChat,
    ScriptedModel,
    ScriptedRequest,
    arithmetic_examples,
)
from adapters.simulated_server import ServerConfig, SimulatedServer
from engine import (
    BadRequestError,
    Budget,
    Completion,
    ConfigError,
    Endpoint,
    Limits,
    PermanentError,
    Price,
    RateLimitedError,
    RateLimitSnapshot,
    RetryPolicy,
    TransientError,
    Usage,
    evaluate,
    optimize,
)
from engine._budget import BudgetMeter
from engine.endpoint._adaptive import AdaptiveConcurrency
from engine.endpoint._hedge import EARLY_ALLOWANCE, EARLY_SHARE, MIN_SAMPLES, Hedger
from engine.endpoint._limits import RateLimiter
from engine.metrics import ExactMatch
from engine.report import RunReport

from .conftest import echo_examples, echo_model, qa_prompt


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while t - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


@pytest.mark.parametrize(("rpm", "per_window"), [(600, 10 + 1), (6000, 100 + 10)])
async def test_rpm_is_never_exceeded_in_any_one_second_window(rpm: int, per_window: int) -> None:
    """Any 1 s window at the provider holds at most rpm/60 plus the default burst, a
    tenth of a second's worth (at least 1): the bound written out, not computed by the
    code under test.  A loaded machine can only make the requests later, never denser:
    the bucket holds no more than its burst however long the loop stalls."""
    model = echo_model()
    n = 3 * per_window
    result = await evaluate(
        qa_prompt(),
        echo_examples(n),
        model=model,
        metric=ExactMatch(),
        limits=Limits(rpm=rpm, concurrency=50),
    )
    assert result.completed == n
    times = model.request_times()
    assert max_in_window(times, 1.0) <= per_window
    # and the rate held overall: after the burst, one request per 60/rpm seconds
    burst = per_window - rpm // 60
    assert times[-1] - times[0] >= (n - burst) * 60 / rpm - 1e-6


async def test_concurrency_limit_holds_at_the_provider() -> None:
    model = echo_model(latency=0.02)
    await evaluate(
        qa_prompt(),
        echo_examples(100),
        model=model,
        metric=ExactMatch(),
        limits=Limits(concurrency=7),
        concurrency=40,
    )
    assert model.stats.max_in_flight == 7


def _one_429_after(count: int, retry_after: float, limited_at: list[float]) -> ScriptedModel:
    """An instant provider that answers request number ``count`` with a 429: with no
    latency the engine sees the 429 in the same step it was sent, so no other request
    can start between the two, whatever the load on the machine."""

    def faults(request: ScriptedRequest) -> BaseException | None:
        if not limited_at and len(model.requests) >= count:
            limited_at.append(request.time)
            return RateLimitedError(retry_after=retry_after)
        return None

    model = echo_model(faults=faults)
    return model


@pytest.mark.parametrize("rpm", [None, 1200], ids=["slots", "rate-limited"])
async def test_retry_after_pauses_every_worker(rpm: float | None) -> None:
    """One 429 with Retry-After 0.5 s: no request starts at the provider until it ends.
    With a request rate, workers wait inside their slot for the bucket while the 429
    arrives: the gate is checked again after the bucket, so they wait out the pause."""
    limited_at: list[float] = []
    model = _one_429_after(5, 0.5, limited_at)
    endpoint = Endpoint(
        model, limits=Limits(concurrency=8, rpm=rpm), retry=RetryPolicy(base_delay=0.001)
    )
    result = await evaluate(qa_prompt(), echo_examples(60), model=endpoint, metric=ExactMatch())
    assert result.completed == 60 and result.errors == 0
    start, end = limited_at[0], limited_at[0] + 0.5
    assert [t for t in model.request_times() if start < t < end] == []
    assert endpoint.statistics().rate_limited == 1
    assert endpoint.limiter.statistics().pauses == 1


async def test_tokens_per_minute_bucket_charges_what_was_really_used() -> None:
    """TPM 36,000 (600 tokens/s, a bucket of one second's worth).  Each call is
    estimated at a few tokens (max_tokens=1) but uses about 50: what the estimate
    missed is charged after the call, so the calls still take the time their real
    tokens need."""
    model = ScriptedModel(lambda r: "x" * 160, name="tok")  # 41 completion tokens
    endpoint = Endpoint(model, limits=Limits(tpm=36_000, concurrency=20))
    prompt = qa_prompt(params={"max_tokens": 1})
    started = anyio.current_time()
    await evaluate(prompt, echo_examples(60), model=endpoint, metric=lambda e, p: 1.0)
    elapsed = anyio.current_time() - started
    used = endpoint.statistics().usage.total_tokens
    assert used > 60 * 45
    # everything beyond the first second's bucket took 1 s per 600 tokens
    assert elapsed >= (used - 600 - 60 * 45) / 600


def test_backoff_is_full_jitter_over_the_whole_ceiling() -> None:
    """uniform(0, min(max_delay, base * 2^(n-1))): the mean of many draws is half the
    ceiling (a zero backoff, or a fixed one, fails this), none above it."""
    import random
    import statistics

    policy = RetryPolicy(base_delay=0.5, max_delay=8.0)
    rng = random.Random(1)
    for attempt, ceiling in ((1, 0.5), (3, 2.0), (6, 8.0), (9, 8.0)):
        draws = [policy.backoff(attempt, rng) for _ in range(2000)]
        assert max(draws) <= ceiling
        assert statistics.mean(draws) == pytest.approx(ceiling / 2, rel=0.05)
        assert statistics.pstdev(draws) == pytest.approx(ceiling / 12**0.5, rel=0.06)


@pytest.mark.parametrize(
    "error", [BadRequestError("bad", status=400), BadRequestError("gone", status=404)]
)
async def test_client_errors_are_never_retried(error: Exception) -> None:
    model = echo_model(faults=lambda r: error)
    result = await evaluate(
        qa_prompt(), echo_examples(3), model=model, metric=ExactMatch(), concurrency=1
    )
    assert model.calls == 3 and result.errors == 3 and result.retries == 0


def test_retry_policy_backoff_is_full_jitter_and_bounded() -> None:
    import random

    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    waits = [policy.backoff(attempt, rng) for attempt in range(1, 10) for _ in range(50)]
    assert min(waits) >= 0.0 and max(waits) <= 8.0
    assert policy.should_retry(TransientError("x"), 1) and not policy.should_retry(
        TransientError("x"), 8
    )
    assert not policy.should_retry(BadRequestError("x"), 1) and not policy.should_retry(
        ValueError(), 1
    )


async def test_call_timeout_is_a_retried_transient_failure() -> None:
    slow_once: set[str] = set()

    async def handler(request: ScriptedRequest) -> str:
        text = request.messages[-1]["content"]
        if text not in slow_once:
            slow_once.add(text)
            await anyio.sleep(10)
        return text

    model = ScriptedModel(handler)
    endpoint = Endpoint(model, retry=RetryPolicy(timeout=0.05, base_delay=0.001))
    result = await evaluate(qa_prompt(), echo_examples(10), model=endpoint, metric=ExactMatch())
    assert result.score == 1.0 and result.retries == 10
    assert endpoint.statistics().timeouts == 10


async def test_limits_are_learned_from_headers_when_unconfigured() -> None:
    limiter = RateLimiter(Limits())
    limiter.observe(
        RateLimitSnapshot(limit_requests=3000, limit_tokens=90_000, remaining_requests=10)
    )
    stats = limiter.statistics()
    assert stats.learned and stats.rpm == pytest.approx(2850) and stats.tpm == pytest.approx(85_500)
    configured = RateLimiter(Limits(rpm=100))
    configured.observe(RateLimitSnapshot(limit_requests=3000))
    assert configured.statistics().rpm == 100


def test_exhausted_remaining_requests_closes_the_gate() -> None:
    """remaining-requests 0 at 60 rpm: closed for the second one request takes to come
    back (on a fake clock: exactly)."""
    from engine.testing import FakeClock

    limiter = RateLimiter(Limits(), clock=FakeClock())
    limiter.observe(RateLimitSnapshot(limit_requests=60, remaining_requests=0))
    assert limiter.paused_for() == 1.0


@pytest.mark.parametrize("kwargs", [{"rpm": 0}, {"tpm": -5}, {"concurrency": 0}, {"burst": -1}])
def test_impossible_limits_are_config_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_pause_gate_extends_never_shortens_on_a_fake_clock() -> None:
    """The gate's deadline only moves later; time is stepped by hand, nothing sleeps."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    limiter.pause(2.0)
    limiter.pause(0.5)  # a shorter Retry-After from another worker does not shorten it
    assert limiter.paused_for() == 2.0 and limiter.statistics().pauses == 1
    clock.advance(1.5)
    assert limiter.paused_for() == 0.5
    limiter.pause(3.0)
    assert limiter.paused_for() == 3.0 and limiter.statistics().pauses == 2
    clock.advance(3.0)
    assert limiter.paused_for() == 0.0


def test_unknown_limit_429s_start_aimd_pacing_on_a_fake_clock() -> None:
    """No configured or announced limit: 429s slow the pace, successes ease it again."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    for _ in range(20):  # 10 successes per second over the last 2 s
        limiter.on_success()
        clock.advance(0.1)
    limiter.on_rate_limited()
    pacer = limiter._pacer
    assert pacer is not None and pacer.interval == pytest.approx(1 / 10, rel=0.1)
    limiter.on_rate_limited()
    assert pacer.interval > 1 / 10  # backs off further
    slow = pacer.interval
    for _ in range(5):
        limiter.on_success()
    assert pacer.interval < slow
    limiter.observe(RateLimitSnapshot(limit_requests=600))
    assert limiter._pacer is None and limiter.statistics().rpm == pytest.approx(570)


@pytest.mark.looptime
async def test_deadline_bounds_a_hanging_attempt_too() -> None:
    """An attempt may not outlive the call's deadline, whatever the per-attempt timeout."""
    model = ScriptedModel(lambda r: "x", latency=30.0)
    endpoint = Endpoint(model, retry=RetryPolicy(timeout=60, deadline=0.3, base_delay=0.01))
    started = anyio.current_time()
    result = await evaluate(qa_prompt(), echo_examples(2), model=endpoint, metric=ExactMatch())
    assert anyio.current_time() - started == pytest.approx(0.3, abs=0.01)
    assert result.errors == 2 and result.outcomes[0].error.type == "CallTimeoutError"  # type: ignore[union-attr]


async def test_builtin_timeouts_and_socket_errors_from_a_model_are_retried() -> None:
    """A model that lets TimeoutError or ConnectionError escape still gets retries."""
    seen: dict[str, int] = {}

    def flaky(request: ScriptedRequest) -> BaseException | None:
        text = request.messages[-1]["content"]
        seen[text] = seen.get(text, 0) + 1
        if seen[text] == 1:
            return TimeoutError("read timed out")
        if seen[text] == 2:
            return ConnectionResetError("peer reset")
        return None

    model = echo_model(faults=flaky)
    endpoint = Endpoint(model, retry=RetryPolicy(base_delay=0.001))
    result = await evaluate(qa_prompt(), echo_examples(10), model=endpoint, metric=ExactMatch())
    assert result.score == 1.0 and result.errors == 0 and result.retries == 20


async def test_a_model_returning_text_is_accepted_and_garbage_is_a_clear_bug() -> None:
    class TextModel:
        async def complete(self, messages: object, **params: object) -> str:
            return "item 0"

    class BrokenModel:
        async def complete(self, messages: object, **params: object) -> object:
            return {"text": "item 0"}

    ok = await evaluate(qa_prompt(), echo_examples(1), model=TextModel(), metric=ExactMatch())  # type: ignore[arg-type]
    assert ok.score == 1.0
    with pytest.raises(TypeError, match=r"not an engine\.Completion"):
        await evaluate(qa_prompt(), echo_examples(1), model=BrokenModel(), metric=ExactMatch())  # type: ignore[arg-type]


def test_a_429_under_a_learned_rate_sets_a_ceiling_headers_cannot_lift() -> None:
    """Announced 10^9 RPM, 20 calls/s get through, then a 429: the rate in force drops
    under what got through (1200 RPM) and a later 10^9 header leaves it there.  A 429
    to a request sent under an older rate (``sent_epoch``) lowers nothing again."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    limiter.observe(RateLimitSnapshot(limit_requests=10**9))
    sent_under = limiter.epoch
    for _ in range(40):
        limiter.on_success()
        clock.advance(0.05)
    limiter.on_rate_limited(sent_under)
    lowered = limiter.statistics().rpm
    assert lowered is not None and lowered < 1200
    limiter.observe(RateLimitSnapshot(limit_requests=10**9))
    assert limiter.statistics().rpm == lowered
    limiter.on_rate_limited(sent_under)  # in flight before the drop: no second cut
    assert limiter.statistics().rpm == lowered
    honest = RateLimiter(Limits(), clock=clock)  # a header that matches what got through
    honest.observe(RateLimitSnapshot(limit_requests=1200))
    for _ in range(40):
        honest.on_success()
        clock.advance(0.05)
    honest.on_rate_limited(honest.epoch)
    assert honest.statistics().rpm == pytest.approx(1140)


@pytest.mark.looptime
async def test_429s_cost_no_attempt_while_other_calls_are_answered() -> None:
    """One example is refused 12 times (more than max_attempts=8) while the others are
    answered: it still completes, the provider being up."""

    def faults(request: ScriptedRequest) -> BaseException | None:
        if request.messages[-1]["content"] == "item 0" and request.attempt <= 12:
            return RateLimitedError("slow down")
        return None

    model = echo_model(faults=faults, latency=0.05)
    endpoint = Endpoint(model, limits=Limits(concurrency=4), retry=RetryPolicy(base_delay=0.01))
    result = await evaluate(qa_prompt(), echo_examples(400), model=endpoint, metric=ExactMatch())
    assert result.errors == 0 and result.completed == 400


@pytest.mark.looptime
async def test_a_tiny_learned_limit_is_announced_and_still_honoured() -> None:
    """``limit-requests: 1`` paces one call a minute: kept (it may be true), but said
    once, with how much slower it is than what got through."""
    from engine import Completion
    from engine.testing import EventRecorder

    model = ScriptedModel(
        lambda r: Completion(r.messages[-1]["content"], rate_limits=RateLimitSnapshot(1)),
        latency=0.01,
        limits=Limits(concurrency=1),
    )
    recorder = EventRecorder()
    started = anyio.current_time()
    result = await evaluate(
        qa_prompt(), echo_examples(4), model=model, metric=ExactMatch(), on_event=recorder
    )
    assert result.errors == 0 and result.score == 1.0
    assert anyio.current_time() - started >= 2 * 60  # one a minute (0.95 rpm) after the first
    notices = recorder.named("endpoint.notice")
    assert [n.data["kind"] for n in notices] == ["slow-limit"], notices
    assert "x slower" in notices[0].data["detail"]


@pytest.mark.looptime
async def test_the_deadline_bounds_the_wait_in_the_request_bucket() -> None:
    """RPM 2 and a 3 s deadline: the calls behind the first fail within the deadline
    (loop time), naming it; before, each waited its 30 s turn in the bucket."""
    model = echo_model()
    endpoint = Endpoint(model, limits=Limits(rpm=2, concurrency=4), retry=RetryPolicy(deadline=3))
    started = anyio.current_time()
    result = await evaluate(qa_prompt(), echo_examples(4), model=endpoint, metric=ExactMatch())
    assert anyio.current_time() - started <= 3.5
    assert result.errors == 3 and model.calls == 1
    messages = [o.error.message for o in result.outcomes if o.error is not None]
    assert all("deadline of 3s" in m for m in messages), messages


@pytest.mark.looptime
async def test_a_call_refused_forever_still_ends_while_others_are_answered() -> None:
    """A request the provider always refuses (one request over the whole TPM limit is
    a 429 too) ends: forgiven 429s are capped at three per attempt the policy allows."""

    def faults(request: ScriptedRequest) -> BaseException | None:
        if request.messages[-1]["content"] == "item 0":
            return RateLimitedError("Request too large for tokens per min")
        return None

    model = echo_model(faults=faults, latency=0.05)
    endpoint = Endpoint(
        model, limits=Limits(concurrency=4), retry=RetryPolicy(base_delay=0.01, max_attempts=4)
    )
    result = await evaluate(qa_prompt(), echo_examples(400), model=endpoint, metric=ExactMatch())
    assert result.errors == 1 and result.completed == 400
    error = result.outcomes[0].error
    assert error is not None and error.type == "RateLimitedError"
    attempts = sum(1 for r in model.requests if r.messages[-1]["content"] == "item 0")
    assert 4 < attempts <= 4 + 3 * 4


def test_a_429_with_nothing_got_through_lately_does_not_collapse_a_learned_rate() -> None:
    """Slow calls (nothing answered in the last 2 s) and a 429: no measure of what gets
    through, so the learned rate stands (before the guard it fell to the 6 RPM floor)."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    limiter.observe(RateLimitSnapshot(limit_requests=600))
    limiter.on_success()
    clock.advance(5.0)
    limiter.on_rate_limited(limiter.epoch)
    assert limiter.statistics().rpm == pytest.approx(570)


def test_a_ceiling_is_probed_upward_slowly_and_stepped_down_by_fresh_429s() -> None:
    """Under a ceiling, 5 s without a 429 raise it 10% (never a header); a fresh 429
    under it takes 15% off."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    limiter.observe(RateLimitSnapshot(limit_requests=10**9))
    for _ in range(40):
        limiter.on_success()
        clock.advance(0.05)
    limiter.on_rate_limited(limiter.epoch)
    ceiling = limiter.statistics().rpm
    assert ceiling is not None
    clock.advance(5.0)
    limiter.on_success()
    assert limiter.statistics().rpm == pytest.approx(ceiling * 1.1)
    limiter.on_rate_limited(limiter.epoch)
    assert limiter.statistics().rpm == pytest.approx(ceiling * 1.1 * 0.85)


def test_probing_a_ceiling_never_passes_what_the_headers_announce() -> None:
    """The ceiling only ever holds a rate down: probed up for long enough it stops at
    the header's rate (less the margin), as the cluster's budget does (one rule,
    `engine.endpoint.RateCeiling`); before, the in-process limiter probed past it."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    limiter.observe(RateLimitSnapshot(limit_requests=6000))  # 5700/min learned
    for _ in range(40):
        limiter.on_success()
        clock.advance(0.05)  # 1200/min got through: the header is far above it
    limiter.on_rate_limited(limiter.epoch)
    assert limiter.statistics().rpm == pytest.approx(0.7 * 1200)
    for _ in range(30):  # 840 x 1.1**30 would be 14,600/min
        clock.advance(5.0)
        limiter.on_success()
        rpm = limiter.statistics().rpm
        assert rpm is not None and rpm <= 5700 + 1e-6
    assert limiter.statistics().rpm == pytest.approx(5700)


def test_a_wave_of_429s_saying_the_same_pause_counts_once_on_a_fake_clock() -> None:
    """Eight workers' 429s arrive milliseconds apart, each with the time left until the
    same instant (Gemini's retryDelay): one pause, the gate at the latest instant."""
    from engine.testing import FakeClock

    clock = FakeClock()
    limiter = RateLimiter(Limits(), clock=clock)
    assert limiter.pause(3.0)
    for _ in range(7):
        clock.advance(0.004)
        assert not limiter.pause(3.0 - 0.003)  # a millisecond later each time
    assert limiter.statistics().pauses == 1
    assert limiter.paused_for() == pytest.approx(3.0 - 0.003)
    assert limiter.pause(4.0) and limiter.statistics().pauses == 2  # a real extension


# -- adaptive concurrency: a server that queues gets what it serves -------------------


class _SlotServer:
    """An in-process model that serves ``slots`` calls at a time, ``service`` seconds
    each, and queues the rest (a local model server); a call cancelled while queued
    still holds its place and is served (and counted), as llama.cpp does."""

    def __init__(self, slots: int, service: float) -> None:
        self.slots = anyio.Semaphore(slots)
        self.service = service
        self.served = 0
        self.received = 0

    async def complete(self, messages: list[dict[str, str]], **params: object) -> Completion:
        self.received += 1
        with anyio.CancelScope(shield=True):  # the server works off its queue regardless
            async with self.slots:
                await anyio.sleep(self.service)
                self.served += 1
        await anyio.lowlevel.checkpoint()  # a client that gave up is told now
        return Completion(messages[-1]["content"], finish_reason="stop")


@pytest.mark.looptime
async def test_a_one_slot_server_gets_about_one_call_at_a_time_and_no_timeout() -> None:
    """60 examples at concurrency 16 with a 2 s timeout against one slot at 0.2 s: the
    level drops to what the server serves (announced), no call times out in its queue,
    nothing is sent twice, and the time is the server's own (12 s of loop time)."""
    server = _SlotServer(1, 0.2)
    endpoint = Endpoint(server, limits=Limits(concurrency=16), retry=RetryPolicy(timeout=2.0))
    changes: list[dict[str, object]] = []
    started = anyio.current_time()
    result = await evaluate(
        qa_prompt(),
        echo_examples(60),
        model=endpoint,
        metric=ExactMatch(),
        on_event=lambda e: changes.append(e.data) if e.name == "endpoint.concurrency" else None,
    )
    elapsed = anyio.current_time() - started
    assert result.errors == 0 and result.timeouts == 0
    assert server.received == 60 and result.calls == 60
    assert elapsed <= 12.0 * 1.3
    stats = endpoint.statistics().limiter
    assert stats.level is not None and stats.level <= 3
    assert stats.serves is not None and round(stats.serves) == 1
    assert changes and changes[0]["previous"] == 16 and changes[-1]["concurrency"] == stats.level
    assert "serves about 1 request" in str(changes[0]["reason"])


@pytest.mark.looptime
async def test_without_adaptive_concurrency_the_ceiling_is_the_level() -> None:
    """``adaptive_concurrency=False`` keeps the old behaviour: 16 sent at once to one
    slot, the queued ones time out, are served anyway, and are sent again."""
    server = _SlotServer(1, 0.2)
    limits = Limits(concurrency=16, adaptive_concurrency=False)
    endpoint = Endpoint(server, limits=limits, retry=RetryPolicy(timeout=2.0))
    result = await evaluate(qa_prompt(), echo_examples(60), model=endpoint, metric=ExactMatch())
    assert endpoint.statistics().limiter.level is None
    assert result.timeouts > 0 and server.received > 66


@pytest.mark.looptime
async def test_a_wide_noisy_server_keeps_its_level() -> None:
    """A server that does not queue (log-normal latency, sigma 1: a heavy tail) keeps
    the ceiling: noise is not a queue."""
    model = echo_model(latency=lambda rng: 0.25 * math.exp(rng.gauss(0, 1)), seed=7)
    endpoint = Endpoint(model, limits=Limits(concurrency=32))
    changes: list[object] = []
    await evaluate(
        qa_prompt(),
        echo_examples(3000),
        model=endpoint,
        metric=ExactMatch(),
        on_event=lambda e: changes.append(e.data) if e.name == "endpoint.concurrency" else None,
    )
    assert changes == []
    assert endpoint.statistics().limiter.level == 32
    assert model.stats.max_in_flight == 32


def test_the_queue_shape_gives_the_servers_width() -> None:
    """Round trips that grow in steps of one service time per four calls ahead: a
    four-slot server, found to serve about 4 (a line fitted to steps: 3 to 6); the
    level drops toward that plus a quarter, at most by half at a time."""
    adaptive = AdaptiveConcurrency(32)
    changes = [adaptive.on_answer(n, 0.2 * max(1, math.ceil(n / 4))) for n in range(1, 17)]
    made = [c for c in changes if c is not None]
    assert made[0].level == 16 and made[0].serves is not None and 3 <= made[0].serves <= 6
    for n in range(1, 17):
        adaptive.on_answer(n, 0.2 * max(1, math.ceil(n / 4)))
    assert 5 <= adaptive.level <= 8
    assert adaptive.expected_rtt(12) == pytest.approx(0.6, rel=0.3)


@pytest.mark.slow
async def test_the_simulated_one_slot_server_done_when() -> None:
    """Issue #26's done-when, over real HTTP: the simulated provider serving one request
    at a time (0.2 s each, a timed-out request still served and billed), 60 examples
    at concurrency 16 with a 2 s timeout: no errors, at most 66 requests sent.  The
    time (ideal 12 s) is measured in benchmarks/RESULTS_local.md, not asserted here."""
    config = ServerConfig(slots=1, latency_median=0.2)
    async with SimulatedServer(config) as server, OpenAIChat(base_url=server.base_url) as chat:
        endpoint = Endpoint(chat, limits=Limits(concurrency=16), retry=RetryPolicy(timeout=2.0))
        result = await evaluate(qa_prompt(), echo_examples(60), model=endpoint, metric=ExactMatch())
    assert result.errors == 0 and result.scored == 60
    assert server.stats.received <= 66
    assert server.stats.max_in_flight == 1


# -- hedged requests (opt-in) ----------------------------------------------------------


def _straggling_model(first: float, second: float) -> ScriptedModel:
    """Echoes; each request's first attempt takes ``first`` seconds, any later one
    ``second`` (the duplicate of a hedged call is a fresh draw at the provider)."""

    async def answer(request: ScriptedRequest) -> str:
        await anyio.sleep(first if request.attempt == 1 else second)
        return request.messages[-1]["content"]

    return ScriptedModel(answer)


def test_hedging_is_off_by_default() -> None:
    assert RetryPolicy().hedge_after is None
    assert Endpoint(echo_model()).hedger is None
    with pytest.raises(ConfigError, match="hedge_after"):
        RetryPolicy(hedge_after=0)
    with pytest.raises(ConfigError, match="hedge_after"):
        RetryPolicy(hedge_after="p99")  # type: ignore[arg-type]


@pytest.mark.looptime
async def test_without_hedging_a_straggler_is_waited_for_and_never_doubled() -> None:
    model = _straggling_model(first=10.0, second=0.1)
    started = anyio.current_time()
    result = await evaluate(qa_prompt(), echo_examples(3), model=model, metric=ExactMatch())
    assert anyio.current_time() - started >= 10.0
    assert model.calls == 3 and result.hedges == 0 and result.calls == 3


@pytest.mark.looptime
async def test_a_late_call_sends_one_duplicate_takes_the_first_answer_and_cancels_the_other() -> (
    None
):
    model = _straggling_model(first=10.0, second=0.1)
    endpoint = Endpoint(model, retry=RetryPolicy(hedge_after=1.0), limits=Limits(concurrency=8))
    meter = BudgetMeter(None, ["demo"])
    started = anyio.current_time()
    result = await evaluate(
        qa_prompt(), echo_examples(5), model=endpoint, metric=ExactMatch(), meter=meter
    )
    assert 1.1 <= anyio.current_time() - started < 2.0  # not the 10 s of the stragglers
    assert result.score == 1.0 and result.hedges == 5 and result.retries == 0
    assert model.calls == 10 and model.stats.cancelled == 5  # each loser cancelled
    assert result.calls == 10 and meter.total_calls == 10  # both attempts charged
    stats = endpoint.statistics()
    assert (stats.calls, stats.hedges, stats.hedges_won) == (10, 5, 5)


@pytest.mark.looptime
async def test_a_call_gets_at_most_one_duplicate_however_late_both_are() -> None:
    model = _straggling_model(first=10.0, second=10.0)
    endpoint = Endpoint(model, retry=RetryPolicy(hedge_after=1.0), limits=Limits(concurrency=8))
    started = anyio.current_time()
    result = await evaluate(qa_prompt(), echo_examples(4), model=endpoint, metric=ExactMatch())
    assert 10.0 <= anyio.current_time() - started < 11.0  # the first answers first
    assert model.calls == 8 and result.hedges == 4 and model.stats.cancelled == 4
    assert endpoint.statistics().hedges_won == 0


@pytest.mark.looptime
async def test_a_hedged_call_that_fails_counts_its_duplicate_as_a_hedge_not_a_retry() -> None:
    async def refused_late(request: ScriptedRequest) -> str:
        await anyio.sleep(2.0)  # both attempts, the first and its duplicate
        raise PermanentError("refused", endpoint="scripted", status=400)

    model = ScriptedModel(refused_late)
    endpoint = Endpoint(model, retry=RetryPolicy(hedge_after=1.0), limits=Limits(concurrency=8))
    result = await evaluate(qa_prompt(), echo_examples(3), model=endpoint, metric=ExactMatch())
    assert result.errors == 3 and model.calls == 6
    assert result.hedges == 3 and result.retries == 0  # was: 0 hedges, 3 "retries"
    assert result.calls == 6


def test_the_p95_delay_waits_for_enough_latencies_and_follows_them() -> None:
    hedger = Hedger("p95", clock=lambda: 0.0)
    for seconds in range(1, MIN_SAMPLES):
        hedger.observe(float(seconds))
    assert hedger.delay() is None  # too few to say what is late
    for seconds in range(MIN_SAMPLES, 101):
        hedger.observe(float(seconds))
    assert hedger.delay() == 95.0


def _late_after_warmup() -> ScriptedModel:
    """Echoes.  The warm-up, items 0-39: six (0, 7, ..., 35) take 5 s, the rest 0.1 s,
    so the observed p75 is 0.1 s and the p95 5 s; any later item's first attempt takes
    2 s (late, not past the p95), its duplicate 0.1 s."""

    async def answer(request: ScriptedRequest) -> str:
        item = int(request.messages[-1]["content"].split()[-1])
        if request.attempt > 1:
            await anyio.sleep(0.1)
        elif item < 40:
            await anyio.sleep(5.0 if item % 7 == 0 else 0.1)
        else:
            await anyio.sleep(2.0)
        return request.messages[-1]["content"]

    return ScriptedModel(answer)


async def _after_warmup(limit: int) -> tuple[ScriptedModel, Endpoint, float]:
    """The warm-up, then 100 late calls at once on an endpoint of ``limit`` slots: the
    model, the endpoint and the seconds the 100 took."""
    model = _late_after_warmup()
    endpoint = Endpoint(
        model, retry=RetryPolicy(hedge_after="p95"), limits=Limits(concurrency=limit)
    )
    data = echo_examples(140)
    warm = await evaluate(qa_prompt(), data[:40], model=endpoint, metric=ExactMatch())
    assert warm.hedges == 0  # nothing known yet when they started
    assert endpoint.hedger is not None
    assert (endpoint.hedger.delay(), endpoint.hedger.early_delay()) == (5.0, 0.1)
    started = anyio.current_time()
    late = await evaluate(qa_prompt(), data[40:], model=endpoint, metric=ExactMatch())
    assert late.score == 1.0 and late.completed == 100
    return model, endpoint, anyio.current_time() - started


@pytest.mark.looptime
async def test_on_idle_capacity_late_calls_are_hedged_early_within_the_budget() -> None:
    """Free slots and nobody waiting: a call past the observed p75 gets its duplicate
    at once, not at the p95; 100 such calls get only the budget's, 2% of the first
    attempts so far (140) + 5 = 7.8, so 8, and the other 92 wait for their answer."""
    model, endpoint, took = await _after_warmup(limit=300)
    hedger = endpoint.hedger
    assert hedger is not None
    budget = EARLY_SHARE * 140 + EARLY_ALLOWANCE
    assert hedger.early == math.ceil(budget) == 8
    stats = endpoint.statistics()
    assert (stats.hedges, stats.hedges_won) == (8, 8)  # each answered in ~0.25 s, not 2 s
    assert model.calls == 140 + 8
    assert 2.0 <= took < 2.5  # the 92 beyond the budget were waited for, not hedged


@pytest.mark.looptime
async def test_no_early_hedge_while_every_slot_is_taken() -> None:
    """The same 100 late calls filling all 100 slots: a duplicate would take a slot
    from a first attempt, so nothing is hedged before the p95."""
    model, endpoint, took = await _after_warmup(limit=100)
    assert endpoint.hedger is not None and endpoint.hedger.early == 0
    assert model.calls == 140 and endpoint.statistics().hedges == 0
    assert 2.0 <= took < 2.5


async def _heavy_tail_optimize(hedge: bool, budget: Budget | None = None) -> tuple[Any, Endpoint]:
    """An optimize run against a heavy-tailed task model, hedged at the p95 or not."""

    def heavy_tail(rng: random.Random) -> float:
        return 0.5 * math.exp(rng.gauss(0.0, 1.0))

    retry = RetryPolicy(hedge_after="p95" if hedge else None)
    model = Endpoint(ArithmeticModel(latency=heavy_tail, seed=3), retry=retry)
    data = arithmetic_examples(40)
    result = await optimize(
        qa_prompt(), data[:30], valset=data[30:], metric=ExactMatch(), model=model,
        optimizer_model=ArithmeticCoach(), optimizer_model_name="coach", seed=1, budget=budget,
    )  # fmt: skip
    return result, model


@pytest.mark.looptime
async def test_an_optimize_run_with_hedging_makes_the_decisions_it_makes_without() -> None:
    async def run(hedge: bool) -> tuple[object, ...]:
        result, model = await _heavy_tail_optimize(hedge)
        report = result.report
        steps = [
            (s.batch_ids, s.batch_score, s.best_score, s.val_score, proposals)
            for s in report.steps
            for proposals in [[(p.accepted, p.batch_score, p.full_score) for p in s.proposals]]
        ]
        hedges = model.statistics().hedges
        return (result.prompt.messages, result.score, result.val_score, steps), hedges

    (plain, none_sent), (hedged, sent) = await run(False), await run(True)
    assert none_sent == 0 and sent > 0  # hedging really happened
    assert hedged == plain


@pytest.mark.looptime
async def test_the_run_report_shows_the_hedges_and_their_cost_only_when_a_model_hedged() -> None:
    prices = {"demo": Price(1.0, 4.0), "coach": Price(1.0, 1.0)}
    hedged, model = await _heavy_tail_optimize(True, Budget(prices=prices))
    stats, report = model.statistics(), hedged.report
    hedges = report.hedges
    assert hedges["sent"] == stats.hedges > 0 and hedges["won"] == stats.hedges_won
    prompt, completion = hedges["tokens"]["demo"]
    assert prompt > 0 and completion > 0
    assert hedges["cost"] == pytest.approx(prices["demo"].cost(Usage(prompt, completion)))
    # each duplicate is paid: its estimate is in the run's tokens, beside what was answered
    assert report.tokens["demo"] == [
        stats.usage.prompt_tokens + prompt,
        stats.usage.completion_tokens + completion,
    ]
    assert report.calls["demo"] == stats.calls and report.cost is not None
    assert report.cost > hedges["cost"] > 0
    assert json.loads(report.to_json())["hedges"] == hedges
    line = f"- hedges: {hedges['sent']} duplicate requests sent, {hedges['won']} answered first"
    assert line in report.to_markdown()
    assert f"<p>Hedges: {hedges['sent']} duplicate requests sent" in report.to_html()

    plain, _ = await _heavy_tail_optimize(False, Budget(prices=prices))
    data = plain.report.to_dict()
    assert plain.report.hedges == {} and "hedges" not in data  # the JSON as before hedging
    assert set(data) == {f.name for f in dataclasses.fields(RunReport)} - {"hedges", "program"}
    assert "hedge" not in plain.report.to_markdown().lower()
    assert "hedge" not in plain.report.to_html().lower()
