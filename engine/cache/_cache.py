"""`Cache`: predictions by (request, example id), metric results by (metric, question).

A cache hit must be the same question.  Keys are fixed-shape strings of hashes:

    p:<request sha256>:<example id>   -> prediction text + usage
        request = the prompt hash (messages, model, params), the endpoint's identity
        (adapter and base URL, or an explicit namespace) and the response format
        actually sent
    m:<metric sha256>:<answer sha256> -> metric result
        metric = its code and captured state (`metric_identity`); answer = the
        example's full content (inputs, expected, metadata) and the prediction text
    c:<request sha256>                -> an optimizer call's answer
    e:<example id>                    -> {"inputs": hash} (a reused id with changed
                                         inputs is an error, not a stale hit)

An example id that no store can hold as is (a lone surrogate, a NUL) is written as
ASCII JSON after ``!`` instead of ``:`` (``e!"bad \\udcff"``): escaped, never dropped.

Identical keys requested concurrently are coalesced (single flight): one call is made,
every waiter gets its result.  If the leader is cancelled (its evaluation was cut by
racing), a waiter takes over; if the leader failed, waiters share the failure rather
than paying for the same failing call again.

A store shared by many processes (`PostgresStore`: it has ``claim``, ``wait_for`` and
``release``) extends single flight across them for what is paid for, predictions and
optimizer calls: the leader of a key in this process claims it in the store before it
computes; a process that finds another's live claim waits for that value instead of
paying for it again.  A claim lasts ``claim_ttl`` seconds and is renewed while its call
runs, so however long a call may take, a process that died holding a claim delays the
others by at most ``claim_ttl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, Self, TypeVar, cast

import anyio

from .._closeable import AsyncCloseable
from .._errors import CacheConflictError, CacheError
from .._prompt import canonical_json, normalise_numbers
from .._protocols import CacheStore
from .._types import Example, MetricResult, Usage
from ._identity import metric_identity
from ._json import dump_value, escape_key_part, exact_value, load_value
from ._stores import MemoryStore, SQLiteStore

__all__ = ["Cache", "CacheStatistics", "CachedPrediction", "metric_identity", "request_hash"]

T = TypeVar("T")

# How long a cross-process claim lasts without renewal; renewed every third of it.
DEFAULT_CLAIM_TTL = 10.0


class _ClaimingStore(Protocol):
    """The part of a shared store that single flight across processes uses."""

    async def claim(self, key: str, owner: str, ttl: float) -> bool: ...

    async def release(self, key: str, owner: str) -> None: ...

    async def wait_for(self, key: str, timeout: float) -> str | None: ...  # noqa: ASYNC109

    def new_owner(self) -> str: ...


@dataclass(frozen=True, slots=True)
class CachedPrediction:
    """A stored prediction: the model's text and the usage that was paid for it.

    ``request`` is set on a freshly computed prediction whose request differs from
    the one it was looked up under (see `Cache.prediction`); it is not stored.
    ``finish_reason`` is stored when it is ``"length"`` (a cut answer stays visibly
    cut when it is read back).
    """

    text: str
    usage: Usage
    request: str | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    hits: int
    misses: int
    coalesced: int
    writes: int


class _Unstored(Exception):
    """A computed result that is not to be stored (it would not read back as itself)."""

    def __init__(self, result: MetricResult) -> None:
        super().__init__("not stored")
        self.result = result


class _Flight(Generic[T]):
    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done: anyio.Event | None = None  # made by the first waiter, if any
        self.value: T | None = None
        self.error: Exception | None = None


def request_hash(
    prompt_hash: str, endpoint_identity: str, response_format: Mapping[str, Any] | None
) -> str:
    """The hash of one kind of request: what is asked (the prompt), of whom (the
    endpoint's identity) and in which format (the response format actually sent)."""
    sent = normalise_numbers(dict(response_format)) if response_format is not None else None
    text = canonical_json([prompt_hash, endpoint_identity, sent])
    return hashlib.sha256(text.encode()).hexdigest()


class Cache(AsyncCloseable):
    """The engine's cache over a `CacheStore` (in memory by default).

    Usage::

        cache = Cache()                                   # in memory
        async with Cache.sqlite("runs/cache.sqlite") as cache:   # on disk
            await evaluate(prompt, data, model=m, metric=f, cache=cache)
    """

    def __init__(
        self,
        store: CacheStore | None = None,
        *,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
        max_unsaved: int | None = None,
    ) -> None:
        """``max_unsaved``: at most this many paid calls between their start and the
        store's `put` returning (unbounded when ``None``).  With a store that returns
        from `put` once the row is committed (``PostgresStore(wait_for_commit=True)``),
        a process killed at any moment has cost at most this many calls that nobody
        can reuse; cluster workers set it to their share of the concurrency."""
        if not claim_ttl > 0:
            raise CacheError(f"claim_ttl must be positive, got {claim_ttl!r}")
        if max_unsaved is not None and max_unsaved < 1:
            raise CacheError(f"max_unsaved must be at least 1, got {max_unsaved!r}")
        self.store: CacheStore = store if store is not None else MemoryStore()
        # whether paid keys are claimed across processes (asked once, not per key)
        self._claims = callable(getattr(self.store, "claim", None))
        # an in-memory store's dict, used directly on the hot path (no await per row)
        self._rows = self.store.rows() if type(self.store) is MemoryStore else None
        self.claim_ttl = claim_ttl
        self.max_unsaved = max_unsaved
        self._unsaved: anyio.CapacityLimiter | None = None  # made in the loop that uses it
        self._flights: dict[str, _Flight[Any]] = {}
        self._hits = self._misses = self._coalesced = self._writes = 0
        self._uncacheable: set[int] = set()  # ids of metrics already reported uncacheable

    def first_uncacheable(self, metric: object) -> bool:
        """True the first time ``metric`` is reported as uncacheable to this cache (so
        a run says it once, not once per evaluation)."""
        if id(metric) in self._uncacheable:
            return False
        self._uncacheable.add(id(metric))
        return True

    @classmethod
    def sqlite(cls, path: str, *, flush_interval: float = 0.2) -> Cache:
        """A cache on a SQLite file; open it with ``async with``."""
        return cls(SQLiteStore(path, flush_interval=flush_interval))

    async def open(self) -> Self:
        """Open the store, when it has anything to open (a file, a connection pool)."""
        opener = getattr(self.store, "open", None)
        if opener is not None:
            await opener()
        return self

    async def aclose(self) -> None:
        await self.store.aclose()

    # -- predictions ------------------------------------------------------------------
    async def prediction(
        self,
        request: str,
        example: Example,
        compute: Callable[[], Awaitable[CachedPrediction]],
    ) -> tuple[CachedPrediction, bool]:
        """The cached prediction for (request, example), computing it once if absent.

        ``request`` is a `request_hash`.  Returns ``(prediction, cached)``; ``cached`` is
        true when nothing was paid here.  A computed prediction whose ``request`` differs
        (the endpoint fell back to another response format while retrying) is stored
        under the request it really answered.  Raises `CacheConflictError` when
        ``example.id`` was stored with other inputs.
        """
        key = self.prediction_key(request, example)

        def load(raw: str) -> CachedPrediction:
            return self._decode_prediction(key, raw, example)

        async def compute_and_check() -> tuple[CachedPrediction, str, str]:
            await self._check_example(example)
            value = await compute()
            if value.request is None:  # answered the request it was asked as
                return value, self._encode_prediction(value, example), key
            stored = CachedPrediction(value.text, value.usage, None, value.finish_reason)
            answered = self.prediction_key(value.request, example)
            return stored, self._encode_prediction(stored, example), answered

        return await self._single_flight(key, load, compute_and_check, shared=True)

    @staticmethod
    def prediction_key(request: str, example: Example) -> str:
        """The store key of a prediction (bulk paths use it as a request id)."""
        return _id_key(f"p:{request}", example.id)

    async def has_prediction(self, request: str, example: Example) -> bool:
        """Whether a prediction for (request, example) is stored (checks the inputs)."""
        key = self.prediction_key(request, example)
        raw = await self.store.get(key)
        if raw is None:
            return False
        self._decode_prediction(key, raw, example)
        return True

    async def put_prediction(self, request: str, example: Example, value: CachedPrediction) -> None:
        """Store a prediction obtained outside `prediction` (e.g. from a batch job)."""
        await self._check_example(example)
        await self.store.put(
            self.prediction_key(request, example), self._encode_prediction(value, example)
        )
        self._writes += 1

    def _decode_prediction(self, key: str, raw: str, example: Example) -> CachedPrediction:
        data = self._decode(key, raw)
        if data.get("inputs") != example.inputs_hash:
            raise _conflict(example)
        usage = data.get("usage") or [0, 0]
        finish = data.get("finish")
        return CachedPrediction(
            str(data["text"]),
            Usage(int(usage[0]), int(usage[1])),
            None,
            str(finish) if finish is not None else None,
        )

    @staticmethod
    def _encode_prediction(value: CachedPrediction, example: Example) -> str:
        row: dict[str, object] = {
            "text": value.text,
            "usage": [value.usage.prompt_tokens, value.usage.completion_tokens],
            "inputs": example.inputs_hash,
        }
        if value.finish_reason == "length":  # rows of whole answers stay as they were
            row["finish"] = value.finish_reason
        return dump_value(row)

    @staticmethod
    def example_key(example: Example) -> str:
        """The store key of an example's fingerprint (its id's inputs hash)."""
        return _id_key("e", example.id)

    async def _check_example(self, example: Example) -> None:
        if example.id == example.inputs_hash[:24]:
            return  # a content-hash id: other inputs would have another id
        key = self.example_key(example)
        rows = self._rows
        stored = rows.get(key) if rows is not None else await self.store.get(key)
        if stored is None:
            # what dump_value({"inputs": ...}) writes: the hash is hex, nothing to escape
            fingerprint = f'{{"inputs":"{example.inputs_hash}"}}'
            if rows is not None:
                rows[key] = fingerprint
            else:
                await self.store.put(key, fingerprint)
        elif self._decode(key, stored).get("inputs") != example.inputs_hash:
            raise _conflict(example)

    # -- metric results ---------------------------------------------------------------
    async def metric_result(
        self,
        metric_id: str,
        example: Example,
        prediction: str,
        compute: Callable[[], Awaitable[MetricResult]],
        *,
        on_uncacheable: Callable[[str], None] | None = None,
    ) -> tuple[MetricResult, bool]:
        """The cached result of metric ``metric_id`` (a `metric_identity`) on this
        example's full content and this prediction, computing it once.

        An example whose content is not JSON (an arbitrary object as ``expected``) has
        no key: its result is computed and not stored.  Nor is a result whose trace
        would not read back as itself (a set, a tuple, an object; see `exact_value`):
        it is returned, and ``on_uncacheable`` is called with the reason.  A stored
        trace holds NumPy scalars as Python numbers; the result returned is the one
        stored, so a first run and a cached one see the same values.
        """
        key = self.metric_key(metric_id, example, prediction)
        if key is None:
            return await compute(), False

        def load(raw: str) -> MetricResult:
            data = self._decode(key, raw)
            return MetricResult(float(data["score"]), data.get("feedback"), data.get("trace"))

        async def compute_and_dump() -> tuple[MetricResult, str, str]:
            value = await compute()
            if value.trace is not None:
                try:
                    trace = exact_value(value.trace, "trace")
                except ValueError as exc:
                    if on_uncacheable is not None:
                        on_uncacheable(f"a trace is not cached: {exc}")
                    raise _Unstored(value) from None  # to this caller and any coalesced one
                value = MetricResult(value.score, value.feedback, trace)  # the stored copy
            return value, dump_value(value.to_dict()), key

        try:
            return await self._single_flight(key, load, compute_and_dump)
        except _Unstored as unstored:  # scored, not stored: computed again next time
            return unstored.result, False

    @staticmethod
    def metric_key(metric_id: str, example: Example, prediction: str) -> str | None:
        """The store key of a metric result, or ``None`` when the example's content has
        no canonical form (its results are not cached)."""
        content = example.content_hash
        if content is None:
            return None
        if not _encodable(prediction):
            # a lone surrogate cannot be encoded: hash the escaped text, marked so that
            # no other (content, prediction) pair hashes the same text
            content, prediction = f"{content}!", json.dumps(prediction)
        answer = hashlib.sha256(f"{content}:{prediction}".encode()).hexdigest()
        return f"m:{metric_id}:{answer}"

    # -- optimizer calls --------------------------------------------------------------
    async def call_text(
        self, request: dict[str, Any], compute: Callable[[], Awaitable[str]]
    ) -> tuple[str, bool]:
        """The cached answer text of one optimizer request (messages + params).

        Lets a resumed run replay its gradient, apply and description calls instead of
        paying for them again.
        """
        key = "c:" + hashlib.sha256(canonical_json(request).encode()).hexdigest()

        def load(raw: str) -> str:
            return str(self._decode(key, raw)["text"])

        async def compute_and_dump() -> tuple[str, str, str]:
            text = await compute()
            return text, dump_value({"text": text}), key

        return await self._single_flight(key, load, compute_and_dump, shared=True)

    # -- single flight ----------------------------------------------------------------
    async def _single_flight(
        self,
        key: str,
        load: Callable[[str], T],
        compute: Callable[[], Awaitable[tuple[T, str, str]]],
        *,
        shared: bool = False,
    ) -> tuple[T, bool]:
        """The value under ``key``: stored, being computed by another caller (wait for
        it), or computed here.  ``compute`` returns the value, its JSON text and the key
        to store it under (normally ``key`` itself).  ``shared``: a paid value, single
        flight across processes too when the store can claim keys."""
        rows = self._rows
        while True:
            raw = rows.get(key) if rows is not None else await self.store.get(key)
            if raw is not None:
                self._hits += 1
                return load(raw), True
            flight = self._flights.get(key)
            if flight is None:
                break
            self._coalesced += 1
            if flight.done is None:
                flight.done = anyio.Event()
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.value is not None:
                return flight.value, True
            # the leader was cancelled: look again, and lead if still absent

        lead: _Flight[T] = _Flight()
        self._flights[key] = lead
        try:
            if shared and self._claims:
                value, cached = await self._lead_claimed(key, load, compute)
            else:
                value, cached = await self._compute(compute, paid=shared), False
            lead.value = value
            return value, cached
        except Exception as exc:
            lead.error = exc
            raise
        finally:
            del self._flights[key]
            if lead.done is not None:
                lead.done.set()

    async def _compute(
        self, compute: Callable[[], Awaitable[tuple[T, str, str]]], *, paid: bool
    ) -> T:
        self._misses += 1
        if not paid or self.max_unsaved is None:  # no slot to hold (the usual case)
            value, raw, store_key = await compute()
            if self._rows is not None:
                self._rows[store_key] = raw
            else:
                await self.store.put(store_key, raw)
        else:
            async with self._unsaved_slot():
                value, raw, store_key = await compute()
                await self.store.put(store_key, raw)
        self._writes += 1
        return value

    def _unsaved_slot(self) -> anyio.CapacityLimiter:
        """A slot of ``max_unsaved``, held by a paid call until its value is stored."""
        if self._unsaved is None:
            self._unsaved = anyio.CapacityLimiter(self.max_unsaved or 1)
        return self._unsaved

    async def _lead_claimed(
        self,
        key: str,
        load: Callable[[str], T],
        compute: Callable[[], Awaitable[tuple[T, str, str]]],
    ) -> tuple[T, bool]:
        """Compute ``key`` once among every process sharing the store: claim it, or
        wait for the value of whoever holds the claim (and claim it if they give up)."""
        store = cast(_ClaimingStore, self.store)
        owner = store.new_owner()
        while True:
            if await store.claim(key, owner, self.claim_ttl):
                try:
                    return await self._compute_renewing(store, key, owner, compute), False
                finally:
                    with anyio.CancelScope(shield=True):  # a cancelled call frees its key too
                        await store.release(key, owner)
            raw = await store.wait_for(key, timeout=self.claim_ttl)
            if raw is not None:
                self._hits += 1
                return load(raw), True
            # the holder failed, was cancelled or died: claim it again

    async def _compute_renewing(
        self,
        store: _ClaimingStore,
        key: str,
        owner: str,
        compute: Callable[[], Awaitable[tuple[T, str, str]]],
    ) -> T:
        """`_compute`, renewing the claim on ``key`` until the value is stored."""

        async def renew() -> None:
            while True:
                await anyio.sleep(self.claim_ttl / 3)
                with contextlib.suppress(CacheError):  # at worst another process pays too
                    await store.claim(key, owner, self.claim_ttl)

        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(renew)
            try:
                value = await self._compute(compute, paid=True)
            except Exception as exc:  # re-raised as itself below, not as an ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return value

    @staticmethod
    def _decode(key: str, raw: str) -> dict[str, Any]:
        try:
            data = load_value(raw)
        except ValueError as exc:
            raise CacheError(f"cache entry {key!r} is not valid JSON (corrupted store?)") from exc
        if not isinstance(data, dict):
            raise CacheError(f"cache entry {key!r} has an unexpected shape")
        return data

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(self._hits, self._misses, self._coalesced, self._writes)

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<Cache {self.store!r} hits={s.hits} misses={s.misses} coalesced={s.coalesced}>"


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 once encoded (no lone surrogate)."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _id_key(prefix: str, example_id: str) -> str:
    """``prefix:id``; an id no store can hold as is (a lone surrogate, a NUL) is
    written ``prefix!"<ASCII JSON>"`` instead: escaped, never dropped, and distinct from
    every other id's key (no plain key has ``!`` there)."""
    escaped = escape_key_part(example_id)
    return f"{prefix}:{example_id}" if escaped is None else f"{prefix}!{escaped}"


def _conflict(example: Example) -> CacheConflictError:
    return CacheConflictError(
        f"example id {example.id!r} was cached with different inputs; give changed rows "
        "new ids (or omit ids to use content hashes)"
    )
