"""Results back at the driver: in dataset order, counted, charged, written back.

`Delivery` takes each batch's result as it arrives (in any order), keeps it until the
batches before it are in, then hands its outcomes to ``on_outcome`` as a local run
would, counts them in a `Tally` (exact fractions: the score does not depend on arrival
order), charges the run's budget meter and reports progress per worker.  `Relay` is
the driver's side of a cache only the driver can open (memory, SQLite).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace

from .._aggregate import global_scores
from .._budget import BudgetMeter
from .._errors import ConfigError
from .._options import OutcomeCallback
from .._outcome import Evaluation, Outcome
from .._tally import Tally
from .._types import MetricResult, Usage
from ..cache import Cache, metric_identity
from ._plan import Plan
from ._source import ExampleBatch, FileBatch
from ._worker import BatchResult

__all__ = ["Delivery", "Relay"]


class Relay:
    """The driver's side of a relayed cache: seed each batch, write its rows back."""

    def __init__(self, plan: Plan) -> None:
        assert plan.cache is not None
        self.store = plan.cache.store
        self.request = plan.endpoint.request_key(plan.prompt)
        self.metric_id = metric_identity(plan.runner.metric)

    async def seed(self, batch: ExampleBatch) -> ExampleBatch:
        rows: dict[str, str] = {}
        for example in batch.examples:
            key = Cache.prediction_key(self.request, example)
            for name in (key, Cache.example_key(example)):
                raw = await self.store.get(name)
                if raw is not None:
                    rows[name] = raw
            if key in rows and self.metric_id is not None:
                text = _stored_text(rows[key])
                metric_key = Cache.metric_key(self.metric_id, example, text) if text else None
                raw = await self.store.get(metric_key) if metric_key is not None else None
                if raw is not None:
                    assert metric_key is not None
                    rows[metric_key] = raw
        return replace(batch, seed=rows)

    async def write_back(self, rows: dict[str, str]) -> None:
        for key, value in rows.items():
            await self.store.put(key, value)


def _stored_text(raw: str) -> str | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None  # a corrupted row: the worker's cache reports it
    text = data.get("text") if isinstance(data, dict) else None
    return text if isinstance(text, str) else None


class Delivery:
    """Batch results back in dataset order: each outcome to the caller as a local run
    gives it, counts to a `Tally`, costs to the meter, progress to the events."""

    def __init__(
        self,
        plan: Plan,
        *,
        models: frozenset[str],
        on_outcome: OutcomeCallback | None,
        keep_outcomes: bool,
        meter: BudgetMeter | None,
        relay: Relay | None,
        progress_interval: float,
    ) -> None:
        self.plan = plan
        self.on_outcome = on_outcome
        self.keep_outcomes = keep_outcomes
        self.meter = meter
        self.relay = relay
        self.progress_interval = progress_interval
        self.tally = Tally(plan.total, None)
        self.waiting: dict[int, tuple[ExampleBatch | FileBatch, BatchResult]] = {}
        self.next_seq = 0
        self.before = 0  # examples in the batches emitted so far
        self.outcomes: list[Outcome] = []
        self.results: list[tuple[int, MetricResult | None, str]] = []  # for a global metric
        # slot -> [examples, calls]: every worker of the pass, from the start
        self.per_worker: dict[int, list[int]] = {slot: [0, 0] for slot in plan.slots}
        self.running: dict[int, int] = {}  # slot -> examples sent, not back (the feeder's)
        self.models = models  # the evaluated prompts' models: their calls are the ledger's
        self.model_calls = 0  # ... as the delivered batches charged them
        self.model_usage = Usage()
        self.started = self.last_progress = time.monotonic()

    async def __call__(self, batch: ExampleBatch | FileBatch, result: BatchResult) -> bool:
        self._charge(result)
        if self.relay is not None and result.written:
            await self.relay.write_back(result.written)
        for name, level, data in result.events:
            self.plan.emitter.emit(name, level=level, **{**data, "worker": result.slot})
        if result.seq >= self.next_seq:
            self.waiting[result.seq] = (batch, result)
        while self.next_seq in self.waiting:
            ready, ready_result = self.waiting.pop(self.next_seq)
            self.next_seq += 1
            await self._emit(ready, ready_result)
        self._progress()
        return result.stopped

    def _charge(self, result: BatchResult) -> None:
        tally = self.tally
        tally.calls += result.calls
        tally.retries += result.retries
        tally.hedges += result.hedges
        tally.usage = tally.usage + result.usage
        counts = self.per_worker.setdefault(result.slot, [0, 0])
        counts[0] += len(result.outcomes)
        counts[1] += result.calls
        for model in self.models:
            self.model_calls += result.charged_calls.get(model, 0)
            self.model_usage = self.model_usage + result.charged_usage.get(model, Usage())
        if self.meter is not None:
            for model, calls in result.charged_calls.items():
                for _ in range(calls):
                    self.meter.charge_call(model)
            for model, usage in result.charged_usage.items():
                self.meter.charge_usage(model, usage)  # the hedges' estimate included
            for model, (sent, won, estimated) in result.charged_hedges.items():
                self.meter.count_hedges(model, sent, won, estimated)

    async def _emit(self, batch: ExampleBatch | FileBatch, result: BatchResult) -> None:
        # file rows become examples in the worker (blank lines skipped): count them there
        first = batch.start if isinstance(batch, ExampleBatch) else self.before
        self.before += result.examples
        for outcome in sorted(result.outcomes, key=lambda o: o.index):
            placed = replace(outcome, index=first + outcome.index)
            self.tally.add(placed)
            if self.plan.program is not None:  # the run's per-stage counts, as locally
                for call in placed.trace:
                    if call.error is None:
                        self.plan.program.counts.add(call.prompt, cached=call.cached)
            if self.plan.global_metric is not None:
                message = placed.error.message if placed.error is not None else ""
                self.results.append((placed.index, placed.result, message))
            if self.keep_outcomes:
                self.outcomes.append(placed)
            if self.on_outcome is not None:
                maybe = self.on_outcome(placed)
                if maybe is not None:
                    await maybe

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress < self.progress_interval:
            return
        self.last_progress = now
        elapsed = max(now - self.started, 1e-9)
        self.plan.emitter.emit(
            "evaluation.progress",
            level="debug",
            **self.tally.progress(),
            elapsed=round(elapsed, 3),
            workers=[
                {
                    "worker": slot,
                    "done": n,
                    "running": self.running.get(slot, 0),
                    "calls": calls,
                    "per_s": round(n / elapsed, 1),
                }
                for slot, (n, calls) in sorted(self.per_worker.items())
            ],
        )

    def result(self, stopped_at: float | None) -> Evaluation:
        """The `Evaluation` a local run would return (``stopped_at``: racing's bound)."""
        t, plan = self.tally, self.plan
        if t.total is not None and t.completed == t.total:
            stopped_at = None  # every outcome is in: nothing was cut (as a local run says)
        if t.completed == 0 and stopped_at is None:
            raise ConfigError("the dataset is empty")
        if plan.global_metric is not None:
            score, conservative = global_scores(plan.global_metric, self.results)
        else:
            score, conservative = t.mean(), t.conservative_mean()
        self.outcomes.sort(key=lambda o: o.index)
        return Evaluation(
            prompt_hash=plan.identity,
            score=score,
            conservative_score=conservative,
            **t.counts(),
            wall_time=time.monotonic() - self.started,
            stopped_early=stopped_at is not None,
            upper_bound=stopped_at,
            must_beat=None,
            outcomes=tuple(self.outcomes),
        )
