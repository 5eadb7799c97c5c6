"""Cache: complete keys, single flight, SQLite durability, conflicts, JSON only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from engine import (
    Cache,
    CacheConflictError,
    CacheError,
    Example,
    MemoryStore,
    MetricResult,
    SQLiteStore,
    evaluate,
)
from engine.cache._identity import metric_identity
from engine.metrics import ExactMatch
from engine.testing import EventRecorder, ScriptedModel, ScriptedRequest

from .conftest import echo_examples, echo_model, qa_prompt


async def test_second_evaluation_of_the_same_prompt_makes_zero_calls() -> None:
    cache, model, data = Cache(), echo_model(), echo_examples(50)
    first = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
    second = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
    assert model.calls == 50 and first.calls == 50 and second.calls == 0
    assert second.cache_hits == 50 and second.score == first.score


async def test_changed_temperature_makes_every_call_again() -> None:
    cache, model, data = Cache(), echo_model(), echo_examples(20)
    await evaluate(qa_prompt(temperature=0.0), data, model=model, metric=ExactMatch(), cache=cache)
    again = await evaluate(
        qa_prompt(temperature=0.5), data, model=model, metric=ExactMatch(), cache=cache
    )
    assert again.calls == 20 and again.cache_hits == 0 and model.calls == 40


async def test_concurrent_evaluations_of_one_prompt_make_one_call_per_example() -> None:
    """Single flight: identical keys in flight are coalesced across evaluations."""
    cache, model, data = Cache(), echo_model(latency=0.02), echo_examples(60)
    results = []

    async def run() -> None:
        results.append(
            await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
        )

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        tg.start_soon(run)
    assert model.calls == 60
    assert [r.score for r in results] == [1.0, 1.0]
    assert cache.statistics().coalesced > 0
    # what one evaluation paid, the other got without paying: hits, never calls
    assert sum(r.calls for r in results) == 60
    assert sum(r.cache_hits for r in results) == 60


async def test_coalesced_waiter_takes_over_when_the_leader_is_cancelled() -> None:
    """A raced-out evaluation cancelling its calls does not strand another one's examples."""
    cache, model, data = Cache(), echo_model(latency=0.05), echo_examples(20)

    async def cut_short() -> None:
        with anyio.move_on_after(0.02):
            await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)

    async with anyio.create_task_group() as tg:
        tg.start_soon(cut_short)
        await anyio.sleep(0.005)
        full = await evaluate(qa_prompt(), data, model=model, metric=ExactMatch(), cache=cache)
    assert full.completed == 20 and full.errors == 0 and full.score == 1.0


async def test_reused_id_with_changed_inputs_raises(tmp_path: Path) -> None:
    async with Cache.sqlite(str(tmp_path / "c.sqlite")) as cache:
        model = echo_model()
        await evaluate(
            qa_prompt(),
            [Example({"question": "a"}, "a", id="x")],
            model=model,
            metric=ExactMatch(),
            cache=cache,
        )
        changed = [Example({"question": "b"}, "b", id="x")]
        for prompt in (qa_prompt(), qa_prompt(system="Another prompt.")):
            with pytest.raises(CacheConflictError, match="'x'"):
                await evaluate(
                    prompt, changed, model=model, metric=ExactMatch(), cache=cache, on_error="raise"
                )


_CHILD = textwrap.dedent(
    """
    import sys, anyio, json
    sys.path.insert(0, {root!r})
    from tests.conftest import echo_examples, echo_model, qa_prompt
    from engine import Cache, evaluate
    from engine.metrics import ExactMatch

    async def main():
        model = echo_model()
        async with Cache.sqlite({path!r}) as cache:
            r = await evaluate(qa_prompt(), echo_examples(40), model=model, metric=ExactMatch(), cache=cache)
        print(json.dumps({{"calls": model.calls, "hits": r.cache_hits, "score": r.score}}))

    anyio.run(main)
    """
)


def _run_child(root: Path, path: Path) -> dict[str, float]:
    code = _CHILD.format(root=str(root), path=str(path))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sqlite_cache_survives_a_process_restart(tmp_path: Path) -> None:
    """A second process on the same file pays for nothing the first one paid for."""
    root = Path(__file__).resolve().parents[1]
    path = tmp_path / "cache.sqlite"
    first = _run_child(root, path)
    second = _run_child(root, path)
    assert first == {"calls": 40, "hits": 0, "score": 1.0}
    assert second == {"calls": 0, "hits": 40, "score": 1.0}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_a_cold_lookup_reads_nothing_from_the_file(tmp_path: Path) -> None:
    """Keys absent from the file are answered from the store's key hashes: a cold run
    makes no SELECT (it made three per example); a stored row is still read, and an id
    stored with other inputs before the file was reopened is still a conflict."""
    path = tmp_path / "c.sqlite"
    async with Cache.sqlite(str(path)) as cache:
        await evaluate(
            qa_prompt(), echo_examples(3), model=echo_model(), metric=ExactMatch(), cache=cache
        )
    store = SQLiteStore(path)
    await store.open()
    selects: list[str] = []
    assert store._read is not None
    store._read.set_trace_callback(lambda sql: selects.append(sql) if "SELECT" in sql else None)
    cache, model = Cache(store), echo_model()
    fresh = [Example({"question": f"new {i}"}, f"new {i}", id=f"n{i}") for i in range(20)]
    cold = await evaluate(qa_prompt(), fresh, model=model, metric=ExactMatch(), cache=cache)
    assert cold.calls == 20 and cold.score == 1.0 and selects == []
    warm = await evaluate(
        qa_prompt(), echo_examples(3), model=model, metric=ExactMatch(), cache=cache
    )
    assert warm.calls == 0 and warm.cache_hits == 3 and len(selects) == 6  # prediction, metric
    changed = [Example({"question": "other"}, "other", id="e1")]
    with pytest.raises(CacheConflictError, match="'e1'"):
        await evaluate(
            qa_prompt("Another prompt."),
            changed,
            model=model,
            metric=ExactMatch(),
            cache=cache,
            on_error="raise",
        )
    await store.aclose()


async def test_a_reopened_store_filters_again_after_another_writer(tmp_path: Path) -> None:
    """Another connection's commit turns the key-hash set off for that opening only:
    reopened, the store answers absent keys from memory again, and still finds the
    other writer's rows."""
    path = tmp_path / "c.sqlite"
    store = await SQLiteStore(path).open()
    other = await SQLiteStore(path).open()
    await other.put("p:theirs", '"1"')
    await other.aclose()
    with anyio.fail_after(20):  # seen by our writer within _POLL s on a free machine
        while await store.get("p:theirs") is None:
            await anyio.sleep(0.02)
    assert store._known is None  # from then on every lookup reads the file
    await store.aclose()
    await store.open()
    assert await store.get("p:absent") is None and store._known is not None
    assert await store.get("p:theirs") == '"1"'
    await store.aclose()


async def test_a_writer_that_cannot_read_the_data_version_reads_every_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When SQLite cannot say whether another process wrote (the pragma fails), the
    store assumes it did: the writer goes on and every lookup reads the file, so a row
    another connection wrote is found; nothing fails."""
    path = tmp_path / "c.sqlite"
    store = await SQLiteStore(path).open()

    def fails(conn: sqlite3.Connection) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr("engine.cache._stores._data_version", fails)
    with anyio.fail_after(20):  # the idle writer looks every _POLL s
        while not store._foreign:
            await anyio.sleep(0.02)
    with contextlib.closing(sqlite3.connect(path)) as other, other:
        other.execute("INSERT INTO kv VALUES ('p:theirs', '\"1\"')")
    await store.put("p:ours", '"2"')
    assert await store.get("p:theirs") == '"1"' and await store.get("p:ours") == '"2"'
    await store.aclose()  # the writer did not die: everything committed, no error
    rows = dict(sqlite3.connect(path).execute("SELECT key, value FROM kv").fetchall())
    assert rows == {"p:theirs": '"1"', "p:ours": '"2"'}


async def test_past_its_key_cap_the_store_reads_every_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key-hash set is bounded: past the cap it is dropped (memory stays bounded)
    and lookups read the file again, hits included, at open and while running."""
    monkeypatch.setattr("engine.cache._stores._MAX_FILTERED", 8)
    path, model = tmp_path / "c.sqlite", echo_model()
    for expected_calls in (10, 10):
        async with Cache.sqlite(str(path)) as cache:
            first = await evaluate(
                qa_prompt(), echo_examples(10), model=model, metric=ExactMatch(), cache=cache
            )
            assert cast(SQLiteStore, cache.store)._known is None
            again = await evaluate(
                qa_prompt(), echo_examples(10), model=model, metric=ExactMatch(), cache=cache
            )
        assert again.calls == 0 and again.cache_hits == 10 and model.calls == expected_calls
    assert first.calls == 0  # the second open: every row found


@pytest.mark.parametrize(
    "expected",
    [
        "",
        "plain",
        'quote " and \\ back',
        "ctl \x00\x01\n\t\x7f",
        "é ü 中文 🙂",
        "\u2028\u2029",
        "\udcff",
    ],
)
def test_the_content_hash_of_a_plain_row_is_the_canonical_one(expected: str) -> None:
    """The fast path for a str ``expected`` and no metadata writes what canonical_json
    writes, byte for byte: metric results cached before it are still hits (a lone
    surrogate: no hash, as before)."""
    from engine._prompt import canonical_json

    example = Example({"question": "q", "n": 1}, expected, id="x")
    try:
        text = canonical_json([example.inputs_hash, expected, {}]).encode()
        want: str | None = hashlib.sha256(text).hexdigest()
    except UnicodeEncodeError:
        want = None
    assert example.content_hash == want


async def test_rows_another_process_commits_after_we_opened_are_hits(tmp_path: Path) -> None:
    """Rows a real second process writes while our store is open (and has its key
    hashes) are found once the writer thread has seen SQLite's data version move: the
    same 40 examples then cost nothing, and a changed example under a stored id is a
    conflict, not a miss."""
    root, path = Path(__file__).parents[1], tmp_path / "c.sqlite"  # tests/ of this tree
    async with Cache.sqlite(str(path)) as cache:
        model = echo_model()
        await evaluate(
            qa_prompt(), echo_examples(2, "own"), model=model, metric=ExactMatch(), cache=cache
        )
        assert await anyio.to_thread.run_sync(_run_child, root, path) == {
            "calls": 40,
            "hits": 0,
            "score": 1.0,
        }
        (key,) = (
            sqlite3.connect(path).execute("SELECT key FROM kv WHERE key LIKE 'p:%e7'").fetchone()
        )
        with anyio.fail_after(20):  # seen within _POLL s on a free machine
            while await cache.store.get(key) is None:
                await anyio.sleep(0.02)
        again = await evaluate(
            qa_prompt(), echo_examples(40), model=model, metric=ExactMatch(), cache=cache
        )
        assert again.calls == 0 and again.cache_hits == 40 and model.calls == 2
        changed = [Example({"question": "other"}, "other", id="e5")]
        with pytest.raises(CacheConflictError, match="'e5'"):
            await evaluate(
                qa_prompt("Another."),
                changed,
                model=model,
                metric=ExactMatch(),
                cache=cache,
                on_error="raise",
            )


async def test_sqlite_values_are_json_and_durable_within_a_second(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    store = SQLiteStore(path, flush_interval=0.1)
    await store.open()
    cache = Cache(store)
    await evaluate(
        qa_prompt(), echo_examples(5), model=echo_model(), metric=ExactMatch(), cache=cache
    )
    await anyio.sleep(0.5)  # without closing: what a crash would leave
    rows = sqlite3.connect(path).execute("SELECT key, value FROM kv").fetchall()
    assert len(rows) == 15  # 5 predictions, 5 metric results, 5 example fingerprints
    for key, value in rows:
        assert key[:2] in {"p:", "m:", "e:"}
        assert isinstance(json.loads(value), dict)  # every row, fingerprints included
    await store.aclose()


async def test_corrupted_cache_file_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CacheError, match="not a readable cache"):
        async with Cache.sqlite(str(path)):
            pass


async def test_corrupted_entry_is_an_error_not_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async with Cache.sqlite(str(path)) as cache:
        await evaluate(
            qa_prompt(), echo_examples(1), model=echo_model(), metric=ExactMatch(), cache=cache
        )
    conn = sqlite3.connect(path)
    conn.execute("UPDATE kv SET value = 'not json' WHERE key LIKE 'p:%'")
    conn.commit()
    async with Cache.sqlite(str(path)) as cache:
        with pytest.raises(CacheError, match="not valid JSON"):
            await evaluate(
                qa_prompt(), echo_examples(1), model=echo_model(), metric=ExactMatch(), cache=cache
            )


class _Counting:
    """A metric that counts its calls; its counter is not state that changes scores,
    so it pins its identity with ``cache_key`` (else the changing list would be part of
    it and every evaluation a miss)."""

    cache_key = "counting"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, ex: Example, pred: str) -> float:
        self.calls.append(ex.id)
        return 1.0


async def test_metric_results_are_cached_by_metric_identity() -> None:
    cache, counting = Cache(), _Counting()
    data = echo_examples(5)
    await evaluate(qa_prompt(), data, model=echo_model(), metric=counting, cache=cache)
    await evaluate(qa_prompt(), data, model=echo_model(), metric=counting, cache=cache)
    assert len(counting.calls) == 5 + 2  # one preflight check per evaluation; the cached run adds 0
    other = await evaluate(qa_prompt(), data, model=echo_model(), metric=ExactMatch(), cache=cache)
    assert other.score == 1.0 and other.calls == 0


async def test_max_unsaved_holds_a_paid_call_until_its_put_returns() -> None:
    """max_unsaved=2 over 8 workers: never more than 2 answers between their call's start
    and the end of their (slow, as a commit is) put."""
    state = {"unsaved": 0, "peak": 0}

    def answer(request: ScriptedRequest) -> str:
        state["unsaved"] += 1
        state["peak"] = max(state["peak"], state["unsaved"])
        return request.messages[-1]["content"]

    class SlowStore(MemoryStore):
        async def put(self, key: str, value: str) -> None:
            if key.startswith("p:"):  # longer than a call: the slot must outlast it
                await anyio.sleep(0.03)
            await super().put(key, value)
            if key.startswith("p:"):
                state["unsaved"] -= 1

    cache = Cache(SlowStore(), max_unsaved=2)
    result = await evaluate(
        qa_prompt(), echo_examples(40), model=ScriptedModel(answer, latency=0.01),
        metric=ExactMatch(), cache=cache, concurrency=8,
    )  # fmt: skip
    assert result.completed == 40 and result.score == 1.0 and result.calls == 40
    assert state == {"unsaved": 0, "peak": 2}
    with pytest.raises(CacheError, match="max_unsaved"):
        Cache(max_unsaved=0)


# -- issue 18: text no store can hold, and a writer that fails ---------------------------

_STDERR = b"Traceback: \xff\xfe invalid".decode("utf-8", "surrogateescape")  # lone surrogates


def _stderr_metric(ex: Example, pred: str) -> MetricResult:
    """A code-running metric: its feedback is a subprocess's stderr, read with
    surrogateescape, for one example in a hundred."""
    return MetricResult(1.0, _STDERR if ex.id.endswith("7") else "ok")


def _paid_rows(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM kv WHERE key LIKE 'p%'").fetchone()[0])
    finally:
        conn.close()


async def test_lone_surrogates_in_feedback_and_ids_are_stored_escaped(tmp_path: Path) -> None:
    """Issue 18: one surrogate used to kill the writer (86 of 300 paid rows on disk, the
    error only at aclose).  Every paid row is written, and read back exactly."""
    path = tmp_path / "c.sqlite"
    bad_id = "row-\udcff"
    data = [*echo_examples(299), Example({"question": "odd"}, "odd", id=bad_id)]
    store = SQLiteStore(path, flush_interval=0.05)
    await store.open()
    first = await evaluate(
        qa_prompt(), data, model=echo_model(), metric=_stderr_metric, cache=Cache(store),
        keep_outcomes=True,
    )  # fmt: skip
    with anyio.fail_after(30):  # without closing: what a crash would leave
        while store.statistics()["pending"]:
            await anyio.sleep(0.05)
    assert first.completed == 300 and first.errors == 0
    assert _paid_rows(path) == 300
    await store.aclose()
    model = echo_model()
    async with Cache.sqlite(str(path)) as cache:
        again = await evaluate(
            qa_prompt(), data, model=model, metric=_stderr_metric, cache=cache, keep_outcomes=True
        )
    assert model.calls == 0 and again.cache_hits == 300
    feedback = {o.example_id: o.result.feedback for o in again.outcomes if o.result}
    assert feedback["e7"] == _STDERR and feedback[bad_id] == "ok"
    assert feedback == {o.example_id: o.result.feedback for o in first.outcomes if o.result}


async def test_a_row_the_writer_cannot_write_is_named_at_once_and_spares_its_batch(
    tmp_path: Path,
) -> None:
    """A row SQLite refuses (here a trigger; in the field, text it cannot encode) loses
    only itself: the batch's other rows are committed, and the next get or put raises
    `CacheError` naming the row, rather than aclose alone, after the run."""
    path = tmp_path / "c.sqlite"
    async with SQLiteStore(path):
        pass
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON kv WHEN NEW.key = 'p:bad'"
        " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END"
    )
    conn.commit()
    conn.close()
    store = SQLiteStore(path, flush_interval=0.5)
    await store.open()
    for i in range(300):
        await store.put("p:bad" if i == 150 else f"p:{i}", '{"text": "x"}')
    with anyio.fail_after(30):
        while store.statistics()["pending"]:
            await anyio.sleep(0.02)
    assert _paid_rows(path) == 299
    for operation in (store.get("p:1"), store.put("p:next", "{}")):
        with pytest.raises(CacheError, match=r"1 rows could not be written.*'p:bad'.*refused"):
            await operation
    with pytest.raises(CacheError, match="p:bad"):
        await store.aclose()


async def test_text_no_store_can_hold_is_refused_by_put_itself(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "c.sqlite") as store:
        with pytest.raises(CacheError, match="lone surrogate"):
            await store.put("p:x", '{"text": "\udcff"}')
        with pytest.raises(CacheError, match="NUL"):
            await store.put("p:\x00", "{}")
        await store.put("p:ok", "{}")  # the store goes on
        assert await store.get("p:ok") == "{}"


# -- issue 18: metric identity covers code and class state -------------------------------


async def _scores(metric: Any, cache: Cache) -> list[float]:
    result = await evaluate(
        qa_prompt(), echo_examples(3), model=echo_model(), metric=metric, cache=cache,
        keep_outcomes=True,
    )  # fmt: skip
    return [o.result.score for o in result.outcomes if o.result is not None]


async def test_functions_without_source_are_told_apart_by_their_code() -> None:
    """Two exec'd functions named `score` (a metric fixed and re-run from a REPL) and two
    lambdas on one line used to share one identity, so the second served the first's
    cached scores."""
    cache, namespace = Cache(), {}  # type: dict[str, Any]
    exec("def score(example, prediction):\n    return 1.0", namespace)
    first = namespace["score"]
    exec("def score(example, prediction):\n    return 0.0", namespace)
    fixed = namespace["score"]
    assert await _scores(first, cache) == [1.0] * 3
    assert await _scores(fixed, cache) == [0.0] * 3
    right, wrong = (lambda e, p: 1.0), (lambda e, p: 0.0)
    assert await _scores(right, cache) == [1.0] * 3
    assert await _scores(wrong, cache) == [0.0] * 3
    assert metric_identity(right) == metric_identity(right) is not None


class _Thresh:
    """A metric whose threshold is a class attribute."""

    level = 3

    def __call__(self, example: Example, prediction: str) -> float:
        return float(len(prediction) > self.level)


async def test_a_class_attribute_changed_at_run_time_is_another_metric() -> None:
    cache, metric = Cache(), _Thresh()
    try:
        assert await _scores(metric, cache) == [1.0] * 3  # "item 0" has 6 characters
        _Thresh.level = 10
        assert await _scores(metric, cache) == [0.0] * 3
    finally:
        _Thresh.level = 3


_IDENTITY_CHILD = """
from engine.cache._identity import metric_identity
class Judge:
    threshold = 0.5
    def __call__(self, example, prediction):
        return float(sum(len(w) for w in prediction.split()) > self.threshold)
print(metric_identity(Judge()), metric_identity(lambda e, p: {1.0, 2.5} and 1.0))
"""


def test_code_identity_is_the_same_in_every_process() -> None:
    """Bytecode, constants and class state hash alike whatever the hash seed (a cache
    file is shared across runs); nothing here has source to read."""
    root = Path(__file__).resolve().parents[1]
    seen = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(root)}
        out = subprocess.run(
            [sys.executable, "-c", _IDENTITY_CHILD], capture_output=True, text=True,
            timeout=60, check=True, env=env,
        )  # fmt: skip
        seen.add(out.stdout.strip())
    assert len(seen) == 1 and "None" not in seen.pop()


# -- issue 18: a cached trace comes back as it was ---------------------------------------


def _f1(results: Sequence[MetricResult]) -> float:
    """A micro-F1 over the traces' counts (the global metric of the issue)."""
    tp = sum(r.trace["tp"] for r in results if r.trace)
    fp = sum(r.trace["fp"] for r in results if r.trace)
    fn = sum(r.trace["fn"] for r in results if r.trace)
    return 2 * tp / (2 * tp + fp + fn)


async def test_numpy_counts_in_a_trace_come_back_as_numbers(tmp_path: Path) -> None:
    """`np.int64(1)` used to be stored as "1": the cached run's F1 raised TypeError."""
    np = pytest.importorskip("numpy")

    def counted(example: Example, prediction: str) -> MetricResult:
        hit = example.id != "e0"
        trace = {"tp": np.int64(hit), "fp": np.int64(0), "fn": np.int64(not hit)}
        return MetricResult(np.float64(hit), None, {**trace, "p": [np.float32(0.5), "x"]})

    scores, traces = [], []
    for _ in range(2):  # the second run reads every result from the file
        async with Cache.sqlite(str(tmp_path / "c.sqlite")) as cache:
            result = await evaluate(
                qa_prompt(), echo_examples(4), model=echo_model(), metric=counted,
                cache=cache, global_metric=_f1, keep_outcomes=True,
            )  # fmt: skip
        scores.append(result.score)
        traces.append([o.result.trace for o in result.outcomes if o.result is not None])
    assert scores == [6 / 7, 6 / 7]
    assert traces[0] == traces[1]
    assert {type(v) for t in traces[1] for v in t.values()} == {int, list}


async def test_a_trace_that_would_come_back_changed_is_not_cached_and_says_so() -> None:
    """A set (or a tuple, an int key, an object) used to come back as something else;
    now the example is scored afresh each time and the run says so once per metric."""
    calls: list[str] = []

    def labelled(example: Example, prediction: str) -> MetricResult:
        calls.append(example.id)
        return MetricResult(1.0, None, {"labels": {"a", "b"}, "n": 2})

    def plain(example: Example, prediction: str) -> MetricResult:
        return MetricResult(1.0, None, {"labels": ["a", "b"], "n": 2, "deep": {"x": [None]}})

    cache, recorder = Cache(), EventRecorder()
    for _ in range(2):
        result = await evaluate(
            qa_prompt(), echo_examples(3), model=echo_model(), metric=labelled, cache=cache,
            on_event=recorder, keep_outcomes=True, validate=False,
        )  # fmt: skip
        assert [o.result.trace for o in result.outcomes if o.result] == [
            {"labels": {"a", "b"}, "n": 2}
        ] * 3
    assert len(calls) == 6  # scored both times: nothing stale was served
    (notice,) = recorder.named("metric.uncacheable")
    assert "trace['labels'] is a set" in notice.data["reason"]
    await evaluate(qa_prompt(), echo_examples(3), model=echo_model(), metric=plain, cache=cache)
    assert len([k for k in cache.store._data if k.startswith("m:")]) == 3  # type: ignore[attr-defined]


# -- issue 18: opening a cache file, and saying what is wrong ----------------------------

_OPENER = """
import sys, time, anyio
from engine import SQLiteStore

folder, start, me, files = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])

async def main():
    for i in range(files):  # every process opens fresh file i at the same moment
        while time.time() < start + 0.3 * i:
            await anyio.sleep(0.001)
        async with SQLiteStore(f"{folder}/c{i}.sqlite") as store:
            await store.put(f"row-{me}", "{}")

anyio.run(main)
"""


@pytest.mark.slow
def test_processes_opening_one_fresh_file_at_once_all_succeed(tmp_path: Path) -> None:
    """4 processes open each of 20 fresh files at the same instant: every open succeeds
    and every row is there (it used to fail with 'database is locked' or a UNIQUE error
    on the format marker, worded as a corrupted file)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    start, files = time.time() + 3.0, 20  # after every interpreter has started
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _OPENER, str(tmp_path), str(start), str(me), str(files)],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for me in range(4)
    ]
    errors = [child.communicate(timeout=120)[1] for child in children]
    assert [child.returncode for child in children] == [0] * 4, errors
    for i in range(files):
        conn = sqlite3.connect(tmp_path / f"c{i}.sqlite")
        assert conn.execute("SELECT count(*) FROM kv").fetchone()[0] == 4
        conn.close()


_HOLDER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


async def test_a_lock_held_by_another_process_is_waited_for_then_named(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    async with SQLiteStore(path):
        pass
    holder = _hold_lock(path, 60)
    try:
        started = time.monotonic()
        with pytest.raises(CacheError, match=r"c\.sqlite is locked by another process: still"):
            await SQLiteStore(path, lock_timeout=1.0).open()
        assert time.monotonic() - started >= 1.0  # it waited before saying so
    finally:
        holder.kill()
        holder.communicate()
    holder = _hold_lock(path, 1.0)  # released while the open waits: the open succeeds
    try:
        async with SQLiteStore(path) as store:
            await store.put("k", "{}")
    finally:
        holder.communicate()


@contextlib.contextmanager
def _not_writable(path: Path) -> Iterator[None]:
    """``path`` unwritable for real: chmod, or for root (whom modes do not stop) the
    immutable attribute; skips where neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o500 if path.is_dir() else 0o400)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a path unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_unwritable_places_are_named_not_called_corrupted(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    with _not_writable(folder):
        for fresh in (folder / "c.sqlite", folder / "sub" / "c.sqlite"):
            with pytest.raises(CacheError, match=f"folder {folder}.* not writable|create the fold"):
                await SQLiteStore(fresh).open()
    existing = tmp_path / "ro.sqlite"
    async with SQLiteStore(existing) as store:
        await store.put("k", "{}")
    with _not_writable(existing), pytest.raises(CacheError) as caught:
        await SQLiteStore(existing).open()
    assert "ro.sqlite is read-only" in str(caught.value)
    assert "corrupted" not in str(caught.value)
