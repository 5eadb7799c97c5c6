"""`RayCluster`: the engine's evaluation, spread over the workers of a Ray cluster."""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Self

import anyio

from .._closeable import AsyncCloseable
from .._errors import ConfigError, EngineError
from .._events import Emitter, EventCallback
from .._options import EvaluationOptions
from .._outcome import Evaluation
from .._prompt import Prompt
from .._protocols import ChatModel
from .._types import Example
from ..endpoint import Endpoint, Limits
from ._leased import LeasedModel
from ._racing import RacingTally
from ._rates import RateBudget
from ._ray import ActorDied, ray_module, unwrap_task_error
from ._run import evaluate_on
from ._spend import SpendLedger
from ._worker import ClusterWorker

__all__ = ["RayCluster"]

_ADDRESS = re.compile(r"^ray://[^\s:/]+:\d{1,5}$")
_FINISH_TIMEOUT = 30.0  # seconds the workers get to close an evaluation
_BUDGET_CALL_RETRIES = 3  # a call to a budget actor that died, sent again after its restart
_SPARE_BUDGETS = 4  # rate budget actors kept for new endpoints after theirs went away
_AUTH_MODE = "RAY_AUTH_MODE"  # Ray's switch for token authentication


def _ask_for_token_auth() -> None:
    """Before the engine starts a local Ray: token authentication, asked for.

    A new local Ray turns token authentication on by itself and warns that it did, on
    every run.  Asked for explicitly it is the same setting without the warning: this
    is Ray's own switch-on (the variable, inherited by the cluster's processes, and
    the process's cached config refreshed), minus the warning.  A user's own
    ``RAY_AUTH_MODE`` wins; a Ray without this helper keeps its default.
    """
    if _AUTH_MODE in os.environ:
        return
    try:
        setup = importlib.import_module("ray._private.authentication.authentication_token_setup")
        switch_on = setup._enable_token_auth
    except (ImportError, AttributeError):
        return
    switch_on()


class RayCluster(AsyncCloseable):
    """A pool of evaluation workers on Ray: pass it as ``evaluate(..., cluster=...)``
    or ``optimize(..., cluster=...)``.

    Usage::

        async with RayCluster("local", workers=4) as cluster:
            result = await evaluate(prompt, data, model=chat, metric=metric, cluster=cluster)

    Each worker is an async actor (its own process) running the engine's `evaluate` on
    the batches it is sent; limits given to the adapter hold for the whole cluster (one
    rate budget actor per endpoint; concurrency is split over the workers), racing
    stays exact (one tally actor), a worker that dies has its batches run again.

    Parameters:
        address: ``"local"`` starts Ray on this machine (or uses the Ray this process
            already started); ``"auto"`` joins the cluster this machine belongs to;
            ``"ray://host:port"`` connects through Ray Client.
        workers: worker actors; default one per ``worker_cpus`` of the cluster's CPUs.
        worker_cpus: CPUs Ray reserves for each worker (spreads them over nodes).
            Default 1, except on a ``"local"`` cluster asked for more workers than it
            has CPUs free: then the share that fits (``cluster.workers_fitted``
            event).  Given explicitly, a ``"local"`` cluster that cannot hold
            ``workers x worker_cpus`` fails at once with the arithmetic.  A fraction
            is right when the evaluation is I/O-bound (a worker mostly waits on the
            provider: several fit on a core); a CPU-heavy metric wants 1 per worker.
        batch_size: examples per batch sent to a worker; default a few batches per
            worker (between twice a worker's concurrency and 512, and never more than
            a worker's part of the set, so that every worker gets work).
        num_cpus: CPUs of a ``"local"`` cluster; default this machine's.
        runtime_env: Ray's runtime environment for the workers (code, packages, env
            variables); a local cluster shares this machine's files.
        max_restarts: worker replacements (after deaths) allowed over the cluster's
            life before an evaluation fails; default four per worker.
        start_timeout: seconds to wait for a worker to start.
        on_event: receives the cluster's own events (``cluster.workers_fitted``).
    """

    def __init__(
        self,
        address: str = "local",
        *,
        workers: int | None = None,
        worker_cpus: float | None = None,
        batch_size: int | None = None,
        num_cpus: int | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        max_restarts: int | None = None,
        start_timeout: float = 120.0,
        on_event: EventCallback | None = None,
    ) -> None:
        if address not in ("local", "auto") and not _ADDRESS.match(address):
            raise ConfigError(
                f"a cluster address is 'local', 'auto' or 'ray://host:port', not {address!r}"
            )
        for name, value in (("workers", workers), ("batch_size", batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"RayCluster {name} must be a positive integer, got {value!r}")
        if worker_cpus is not None and not worker_cpus >= 0:
            raise ConfigError(f"worker_cpus must not be negative, got {worker_cpus!r}")
        self.address = address
        self._wanted = workers
        self.worker_cpus = worker_cpus
        self.batch_size = batch_size
        self.num_cpus = num_cpus
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.events = Emitter(on_event).bind(cluster=address)
        self.restarts = 0
        self._ray: Any = None
        self._owns_ray = False
        self._actor: Any = None  # the remote worker class
        self._handles: list[Any] = []
        # the rate budget actor of each endpoint used here, by id(endpoint); weak, so an
        # adapter the user drops takes no actor with it: its actor is kept for the next
        self._budgets: dict[int, tuple[weakref.ref[Endpoint], Any]] = {}
        self._spare_budgets: list[Any] = []  # actors of endpoints that are gone
        self._resets: dict[int, Any] = {}  # a spare's reset, awaited before it is used
        # driver-side endpoints leasing from their budget actor: the wrapper, and the
        # cluster evaluations on it now (by id(endpoint))
        self._attached: dict[int, list[Any]] = {}
        self._tally: Any = None  # the RacingTally actor, once a raced evaluation runs
        self._ledger: Any = None  # the SpendLedger actor, once a metered evaluation runs

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> Self:
        """Connect to (or start) Ray and start the workers; idempotent."""
        if self._handles:
            return self
        ray = self._ray = ray_module()
        if not ray.is_initialized():
            self._init_ray(ray)
        try:
            count, share = self._placement(ray)
        except ConfigError:
            await self.close()  # and Ray, if this object started it
            raise
        self._actor = ray.remote(ClusterWorker).options(
            num_cpus=share, max_concurrency=1000, max_restarts=0, max_task_retries=0
        )
        self._handles = [self._actor.remote(slot) for slot in range(count)]
        # a rate budget actor started now, beside the workers, for the first endpoint:
        # started at its first evaluation, its process would take a core from the
        # workers and hold their first calls back (0.5-0.7 s)
        spare = self._new_budget(Limits())
        self._spare_budgets.append(spare)
        try:
            with anyio.fail_after(self.start_timeout):
                for handle in self._handles:
                    await handle.ping.remote()
                await spare.statistics.remote()
        except TimeoutError:
            await self.close()
            raise EngineError(
                f"cluster workers did not start within {self.start_timeout:g}s "
                f"(are {count} x {share:g} CPUs free?)"
            ) from None
        return self

    def _placement(self, ray: Any) -> tuple[int, float]:
        """Workers and the CPUs of each.  A ``"local"`` cluster knows its CPUs at once:
        an explicit ``worker_cpus`` that cannot fit fails now (not after
        ``start_timeout``), an unset one is shrunk to fit what is free."""
        total = float(ray.cluster_resources().get("CPU", 1.0))
        given = self.worker_cpus
        count = self._wanted or max(1, int(total // given) if given else int(total) or 1)
        if self.address != "local":
            return count, 1.0 if given is None else given  # it may grow: Ray waits
        if given is not None:
            if count * given > total + 1e-9:
                fit = math.floor(total / count * 100) / 100
                raise ConfigError(
                    f"{count} workers x {given:g} CPU > {total:g} CPUs; use "
                    f"worker_cpus={fit:g} (right for an I/O-bound evaluation) or fewer workers"
                )
            return count, given
        free = min(total, float(ray.available_resources().get("CPU", total)))
        if count <= free:
            return count, 1.0
        share = math.floor(free / count * 100) / 100
        if share <= 0:
            raise ConfigError(
                f"{count} workers need CPUs and this Ray has {free:g} of {total:g} free; "
                "close another cluster or pass worker_cpus=0"
            )
        self.events.emit(
            "cluster.workers_fitted",
            level="warning",
            workers=count,
            worker_cpus=share,
            cpus_free=free,
            detail=f"{count} workers x 1 CPU > {free:g} CPUs free: {share:g} CPU each",
        )
        return count, share

    def _init_ray(self, ray: Any) -> None:
        # Blocking for a few seconds, once: Ray must be initialised on the main thread.
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        if self.address == "local":
            options["num_cpus"] = self.num_cpus or os.cpu_count() or 1
            _ask_for_token_auth()
        else:
            options["address"] = self.address
            options.pop("include_dashboard")
        ray.init(**options)
        self._owns_ray = True

    async def open(self) -> Self:
        """`start` (what ``async with`` calls)."""
        return await self.start()

    async def aclose(self) -> None:
        """`close` (what ``async with`` calls, shielded from cancellation)."""
        await self.close()

    async def close(self) -> None:
        """Commit the workers' caches, stop every actor, and Ray if this object started it."""
        ray, handles = self._ray, self._handles
        if ray is None:
            return
        self._handles = []
        with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
            for handle in handles:
                try:
                    await handle.shutdown.remote()
                except Exception:  # a dead worker has nothing to commit
                    continue
        budgets = [actor for _, actor in self._budgets.values()] + self._spare_budgets
        actors = [*handles, *budgets]
        singles = [actor for actor in (self._tally, self._ledger) if actor is not None]
        for handle in [*actors, *singles]:
            ray.kill(handle)
        self._budgets.clear()
        self._spare_budgets.clear()
        self._resets.clear()
        self._tally = self._ledger = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        self._ray = None

    # -- the pool ---------------------------------------------------------------------
    @property
    def workers(self) -> int:
        """Worker actors in the pool (0 before `start`)."""
        return len(self._handles)

    def handle(self, slot: int) -> Any:
        """The worker actor of ``slot`` now."""
        if not self._handles:
            raise ConfigError("the cluster is not started; use 'async with RayCluster(...)'")
        return self._handles[slot]

    async def replace(self, slot: int, dead: Any) -> None:
        """Start a new worker in ``slot`` for the ``dead`` one (once per death: the
        other batches of the dead worker find the new one in place)."""
        if self._handles[slot] is not dead:
            return
        allowed = self.max_restarts if self.max_restarts is not None else 4 * self.workers
        if self.restarts >= allowed:
            raise EngineError(
                f"cluster workers died {self.restarts + 1} times (max_restarts={allowed})"
            )
        self.restarts += 1
        self._ray.kill(dead)
        # In place before the first await: Ray queues calls until the actor is up.
        handle = self._handles[slot] = self._actor.remote(slot)
        with anyio.fail_after(self.start_timeout):
            await handle.ping.remote()

    async def pids(self) -> list[int]:
        """The process id of each worker (tests and benchmarks kill workers by it)."""
        return [int(await handle.ping.remote()) for handle in self._handles]

    def budget_for(self, endpoint: Endpoint) -> Any:
        """The rate budget actor of ``endpoint``: one per endpoint for as long as the
        endpoint lives, so every evaluation on the same adapter shares one budget.  The
        actor of an endpoint that is gone serves the next new one (reset to its limits):
        a service that makes an adapter per request neither starts a process per
        adapter nor keeps one alive per adapter it ever made."""
        key = id(endpoint)
        known = self._budgets.get(key)
        if known is not None and known[0]() is endpoint:
            return known[1]
        self._retire_budgets()
        if self._spare_budgets:
            actor = self._spare_budgets.pop()
            self._resets[key] = actor.reset.remote(endpoint.limits)
        else:
            actor = self._new_budget(endpoint.limits)
        self._budgets[key] = (weakref.ref(endpoint), actor)
        return actor

    def _new_budget(self, limits: Limits) -> Any:
        """A new rate budget actor (a process of its own, no CPU reserved).

        Its process dying (the OOM killer, a node lost) must not fail the evaluations
        leasing from it: Ray starts it again, and a lease that was out is sent again
        (what it learned is lost; the next lease brings back the endpoint's limits).
        Only `ray.kill`, as the cluster ends or retires it, ends it for good.
        """
        options = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": _BUDGET_CALL_RETRIES}
        return self._ray.remote(RateBudget).options(**options).remote(limits)

    def _retire_budgets(self) -> None:
        """Keep the actors of endpoints that are gone as spares (a few; the rest end)."""
        for key, (ref, actor) in list(self._budgets.items()):
            if ref() is None:
                del self._budgets[key]
                self._resets.pop(key, None)
                if len(self._spare_budgets) < _SPARE_BUDGETS:
                    self._spare_budgets.append(actor)
                else:
                    self._ray.kill(actor)

    async def _ready_budget(self, endpoint: Endpoint) -> Any:
        """`budget_for`, with a spare actor's reset done before any worker leases from
        it; a spare that died while it waited is replaced by a new actor."""
        budget = self.budget_for(endpoint)
        reset = self._resets.pop(id(endpoint), None)
        if reset is None:
            return budget
        try:
            await reset
        except Exception as exc:
            if not isinstance(unwrap_task_error(exc), ActorDied):
                raise
            budget = self._new_budget(endpoint.limits)
            self._budgets[id(endpoint)] = (weakref.ref(endpoint), budget)
        return budget

    @asynccontextmanager
    async def attached(self, endpoint: Endpoint) -> AsyncIterator[Any]:
        """While a cluster evaluation runs on ``endpoint``, the driver's own calls on it
        (a trainer's batch step, an `evaluate` run beside) lease from the same budget
        actor as the workers: one endpoint, one rate.  Yields the budget actor."""
        budget = await self._ready_budget(endpoint)
        entry = self._attached.get(id(endpoint))
        if entry is None:
            leased = None
            if not isinstance(endpoint.model, LeasedModel):  # (another cluster's already)
                leased = LeasedModel(
                    endpoint.model, budget, name=endpoint.name,
                    max_wait=endpoint.retry.max_retry_after, limits=endpoint.limits,
                )  # fmt: skip
                endpoint.model = leased
            entry = self._attached[id(endpoint)] = [leased, 0]
        entry[1] += 1
        try:
            yield budget
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._attached[id(endpoint)]
                leased = entry[0]
                if leased is not None:
                    endpoint.model = leased.model
                    with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
                        await leased.release()

    async def budget_statistics(self, model: ChatModel | Endpoint) -> dict[str, Any]:
        """The counters of the rate budget of ``model``'s endpoint on this cluster."""
        endpoint = Endpoint.of(model)
        return dict(await self.budget_for(endpoint).statistics.remote())

    def racing_tally(self) -> Any:
        """The cluster's tally actor (one for every raced evaluation, made once)."""
        if self._tally is None:
            self._tally = self._ray.remote(RacingTally).options(num_cpus=0).remote()
        return self._tally

    def spend_ledger(self) -> Any:
        """The cluster's budget ledger actor (one for every metered evaluation, made once)."""
        if self._ledger is None:
            self._ledger = self._ray.remote(SpendLedger).options(num_cpus=0).remote()
        return self._ledger

    async def finish(self, job_id: str, slots: Iterable[int], events: Emitter) -> None:
        """Close one evaluation on its workers (permits back, caches committed)."""

        async def close(slot: int) -> None:
            try:
                await self._handles[slot].finish.remote(job_id)
            except Exception as exc:
                error = unwrap_task_error(exc)
                if not isinstance(error, ActorDied):  # a dead worker holds nothing
                    events.emit("cluster.finish_failed", level="warning", worker=slot, error=error)

        with anyio.CancelScope(shield=True), anyio.move_on_after(_FINISH_TIMEOUT):
            async with anyio.create_task_group() as tg:
                for slot in slots:
                    tg.start_soon(close, slot)

    # -- evaluation -------------------------------------------------------------------
    async def run_evaluation(
        self, prompt: Prompt, examples: Iterable[Example], options: EvaluationOptions
    ) -> Evaluation:
        """`engine.evaluate` on this cluster (``evaluate(..., cluster=self)`` calls it):
        the same options, the same result.

        ``examples`` may also be a `FileDataset`: Ray Data reads and splits it, the
        driver never holds it (then ``cache`` must be a `PostgresStore` one, or None).
        """
        if not self._handles:
            raise ConfigError("the cluster is not started; use 'async with RayCluster(...)'")
        return await evaluate_on(self, prompt, examples, options)

    def __repr__(self) -> str:
        return f"<RayCluster {self.address!r} workers={self.workers} restarts={self.restarts}>"
