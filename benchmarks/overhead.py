"""Engine overhead against an instant scripted provider: CPU per example and peak RSS.

Each configuration runs in its own subprocess so peak RSS (ru_maxrss) is its own.
Outcomes are streamed (keep_outcomes=False) and examples generated lazily, so what
grows with N is only what the chosen cache must hold.

    python benchmarks/overhead.py --sizes 10000 100000 1000000 --caches none memory sqlite
    python benchmarks/overhead.py --sizes 100000 --caches memory --metrics builtin def async \
        --before /tmp/older-checkout          # each row also on older code, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _metric(variant: str) -> Any:
    """The metric as a user writes it: the built-in ``ExactMatch()``, a plain function
    or a plain coroutine function (neither marked ``inline``)."""
    from engine import Example
    from engine.metrics import ExactMatch

    def plain(example: Example, prediction: str) -> float:
        return 1.0 if prediction == example.expected else 0.0

    async def plain_async(example: Example, prediction: str) -> float:
        return 1.0 if prediction == example.expected else 0.0

    return {"def": plain, "async": plain_async}.get(variant) or ExactMatch()


def _child(n: int, cache_kind: str, variant: str = "builtin") -> dict[str, Any]:
    import anyio

    from adapters import ScriptedModel
    from engine import Cache, Example, Limits, Prompt, evaluate

    prompt = Prompt(
        [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}],
        model="instant",
    )

    def examples() -> Iterator[Example]:
        for i in range(n):
            yield Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}")

    metric = _metric(variant)

    model = ScriptedModel(lambda r: r.messages[-1]["content"], keep_requests=False)

    async def main() -> dict[str, Any]:
        tmp = tempfile.mkdtemp()
        cache = None
        if cache_kind == "memory":
            cache = Cache()
        elif cache_kind == "sqlite":
            cache = await Cache.sqlite(str(Path(tmp) / "c.sqlite")).__aenter__()
        count = 0

        def sink(outcome: object) -> None:
            nonlocal count
            count += 1

        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = await evaluate(
            prompt,
            examples(),
            model=model,
            metric=metric,
            cache=cache,
            limits=Limits(concurrency=64),
            keep_outcomes=False,
            on_outcome=sink,
            progress_interval=3600,
        )
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if cache is not None:
            await cache.aclose()
        assert result.completed == n == count and result.score == 1.0
        return {
            "n": n,
            "cache": cache_kind,
            "metric": variant,
            "wall_s": wall,
            "cpu_s": cpu,
            "cpu_us_per_example": cpu / n * 1e6,
            "examples_per_s": n / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    return anyio.run(main)


METRICS = ("builtin", "def", "async")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--caches", nargs="+", default=["none", "memory", "sqlite"])
    parser.add_argument("--metrics", nargs="+", default=["builtin"], choices=METRICS)
    parser.add_argument("--before", help="an older checkout: every row also runs on its code")
    parser.add_argument("--child", nargs=3)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(int(args.child[0]), args.child[1], args.child[2])))
        return
    rows = []
    trees = [("", None)] + ([(" (before)", args.before)] if args.before else [])
    for cache in args.caches:
        for n in args.sizes:
            for variant in args.metrics:
                for label, tree in trees:
                    env = {**os.environ, "PYTHONPATH": tree} if tree else None
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", str(n), cache, variant],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=env,
                    )
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    row["tree"] = label.strip() or "this"
                    rows.append(row)
                    print(
                        f"{cache:>6} n={n:>8} {variant + label:>16}: "
                        f"{row['cpu_us_per_example']:6.1f} us CPU/example, "
                        f"{row['examples_per_s']:8.0f} examples/s, "
                        f"peak RSS {row['peak_rss_mb']:7.1f} MB",
                        flush=True,
                    )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
