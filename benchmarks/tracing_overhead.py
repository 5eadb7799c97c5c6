"""Client CPU per request with tracing off, on, and before it existed (issue #24).

One instant server (``benchmarks/client_cpu.py``'s), then the ``engine`` client row of
``client_cpu.py`` in its own process, interleaved round by round:

- ``base``: the engine at ``--base`` (a checkout of the commit before tracing), no
  OpenTelemetry imported;
- ``none``: this checkout, OpenTelemetry not imported (the hooks' own cost);
- ``off``: this checkout, the OpenTelemetry API imported but no provider set (the
  engine checks once per run and starts no span);
- ``sdk``: this checkout, the SDK with an in-memory span exporter (SimpleSpanProcessor)
  and an in-memory metric reader: every attempt a span, every metric recorded.

    python benchmarks/tracing_overhead.py --base /tmp/engine-base --repeat 5

CPU is the client process's user + sys time over the timed requests (as client_cpu.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

_CLIENT = """
import sys
sys.path.insert(0, {bench!r})
mode = {mode!r}
if mode == "off":
    import opentelemetry.trace, opentelemetry.metrics  # imported, no provider set
if mode == "sdk":
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    trace.set_tracer_provider(provider)
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
import client_cpu
client_cpu.client("engine", {url!r}, {n}, {warmup}, {concurrency}, None)
"""


def _row(mode: str, source: Path, url: str, args: argparse.Namespace) -> dict[str, Any]:
    code = _CLIENT.format(
        bench=str(source / "benchmarks"),
        mode=mode,
        url=url,
        n=args.n,
        warmup=args.warmup,
        concurrency=args.concurrency,
    )
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--base", type=Path, help="a checkout of the engine before tracing")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from client_cpu import server_process

    modes = [("base", args.base)] if args.base else []
    modes += [("none", ROOT), ("off", ROOT), ("sdk", ROOT)]
    cpu: dict[str, list[float]] = {mode: [] for mode, _ in modes}
    with server_process("minimal") as url:
        for _ in range(args.repeat):
            for mode, source in modes:
                row = _row(mode, source, url, args)
                cpu[mode].append(row["cpu_ms_per_request"] * 1000)  # microseconds
                print(f"{mode}: {cpu[mode][-1]:.1f} us/request", flush=True)
    print("\n| client | CPU per request (median, us) | min-max | vs base (median) |")
    print("|---|---:|---:|---:|")
    reference = statistics.median(cpu["base"]) if "base" in cpu else None
    for mode, values in cpu.items():
        median = statistics.median(values)
        ratio = f"{median / reference - 1:+.1%}" if reference else "-"
        print(f"| {mode} | {median:.1f} | {min(values):.1f}-{max(values):.1f} | {ratio} |")


if __name__ == "__main__":
    main()
