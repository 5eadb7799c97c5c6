"""``textgrad bench RUN.toml``: the command-line face of `engine.bench`.

Options become a `BenchSettings`; the run file gives the prompt, rows, endpoint,
limits, retry policy and price.  The table and the recommendation go to stdout,
progress to stderr, the JSON and the HTML page to files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .._budget import Budget, Price
from ..bench import BenchProgress, BenchReport, BenchSettings, bench_endpoint, plan_bench
from ..endpoint import Limits
from ._console import StatusLine
from ._runfile import EndpointSpec, RunFile, resolve

__all__ = [
    "LimitsInFile",
    "add_bench_arguments",
    "limits_in_file",
    "recommendation_text",
    "run_bench",
]

OpenAdapter = Callable[[AsyncExitStack, EndpointSpec], Awaitable[Any]]


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected levels like 8,32,128, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"levels must be positive integers, got {text!r}")
    return levels


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return parse


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    parser.add_argument("run_file", help="the TOML run file ([model], [prompt], [data])")
    parser.add_argument(
        "--simulated",
        action="store_true",
        help="instead: the engine beside peer patterns on the simulated provider "
        "(benchmarks/throughput.py; its own options: --scenario, --scale)",
    )
    parser.add_argument(
        "--client-cpu",
        action="store_true",
        help="instead: client CPU per request of the engine and plain clients against an "
        "instant server (benchmarks/client_cpu.py; its own options: --rows, --repeat)",
    )
    parser.add_argument(
        "--concurrency", type=_levels, default=(8, 32, 128), help="levels (default 8,32,128)"
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--requests", type=_positive(int), default=200, help="per level (200)")
    size.add_argument("--duration", type=_positive(float), help="seconds per level instead")
    parser.add_argument("--max-requests", type=_positive(int), help="hard cap, retries counted")
    parser.add_argument("--max-cost", type=_positive(float), help="hard cap in USD")
    parser.add_argument("--prompt-tokens", type=_positive(int), help="synthetic prompt size")
    parser.add_argument("--max-tokens", type=_positive(int), help="completion cap to send")
    parser.add_argument("--project", type=_positive(int), help="examples to project for")
    parser.add_argument("--json", help="write the results as JSON to this file")
    parser.add_argument("--html", help="the HTML page (default: next to --json, or the output dir)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the upper bounds; call nothing"
    )


def _settings(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        concurrency=args.concurrency,
        requests=args.requests,
        duration=args.duration,
        max_requests=args.max_requests,
        max_cost=args.max_cost,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        project_examples=args.project,
    )


def _sized(spec: EndpointSpec, concurrency: int) -> EndpointSpec:
    """The endpoint spec with its limits' concurrency raised to the highest level, so an
    adapter that sizes its connection pool from them (`OpenAIChat`) does not cap it."""
    if not dataclasses.is_dataclass(spec) or isinstance(spec, type):
        return spec
    mine = spec.limits or Limits()
    limits = Limits(
        rpm=mine.rpm,
        tpm=mine.tpm,
        burst=mine.burst,
        concurrency=concurrency,
        input_tpm=mine.input_tpm,
        output_tpm=mine.output_tpm,
    )
    return dataclasses.replace(spec, limits=limits)


class _Progress:
    """Progress lines on stderr: a live line on a terminal, every few seconds otherwise."""

    def __init__(self, stream: TextIO, enabled: bool) -> None:
        self.status = StatusLine(stream)
        self.enabled = enabled
        self.ticks = 0

    def __call__(self, p: BenchProgress) -> None:
        if not self.enabled:
            return
        where = f"level {p.level + 1}/{p.levels}, concurrency {p.concurrency}"
        if p.result is not None:
            r = p.result
            rate = f"{r.requests_per_s:.1f} req/s" if r.requests_per_s else "no rate"
            p50 = f"p50 {r.p50_s:.3f} s" if r.p50_s is not None else "no latency"
            line = f"{where}: {r.requests} answered, {rate}, 429s {r.share_429:.1%}, {p50}"
            self.status.write(line, final=True)
            return
        self.ticks += 1
        if not self.status.tty and self.ticks % 5:
            return
        total = f"/{p.planned}" if p.planned is not None else ""
        self.status.write(
            f"{where}: {p.answered}{total} answered, {p.failed} failed, {p.attempts} attempts, "
            f"{p.rate_limited} 429s, {p.elapsed:.0f} s"
        )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


_HEADER = re.compile(r"^\[\s*([^\]]+?)\s*\]\s*(?:#.*)?$")
_LIMITS_KEY = re.compile(r"^[\"']?limits[\"']?\s*[=.]")


@dataclass(frozen=True, slots=True)
class LimitsInFile:
    """How a run file sets ``[model]``'s limits now: ``"inline"`` (``limits = {...}``
    or ``limits.rpm = ...`` under ``[model]``), ``"table"`` (a ``[model.limits]``
    table) or ``"none"``; ``lines`` are the 1-based lines a recommendation replaces."""

    style: str
    lines: tuple[int, ...]


def limits_in_file(text: str) -> LimitsInFile:
    """Find ``[model]``'s limits in a run file's text (tomllib keeps no positions)."""
    header: tuple[str, ...] = ()
    inline: list[int] = []
    table: list[int] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        match = _HEADER.match(line)
        if match:
            header = tuple(p.strip().strip("\"'") for p in match.group(1).split("."))
            if header == ("model", "limits"):
                table.append(number)
            continue
        if not line or line.startswith("#"):
            continue
        if header == ("model",) and _LIMITS_KEY.match(line):
            inline.append(number)
        elif header == ("model", "limits"):
            table.append(number)
    if inline:
        return LimitsInFile("inline", tuple(inline))
    if table:
        # the whole table, header to its last key, comments and blank lines between
        return LimitsInFile("table", tuple(range(table[0], table[-1] + 1)))
    return LimitsInFile("none", ())


def _span(lines: tuple[int, ...]) -> str:
    if lines == tuple(range(lines[0], lines[-1] + 1)):
        return f"{lines[0]}" if len(lines) == 1 else f"{lines[0]}-{lines[-1]}"
    return ",".join(map(str, lines))


def recommendation_text(report: BenchReport, run: RunFile) -> str:
    """The recommendation in the form the run file already uses, with where it goes:
    pasted as told, the file loads (an inline ``limits`` and a ``[model.limits]`` table
    side by side would be a TOML error)."""
    try:
        found = limits_in_file(run.path.read_text(encoding="utf-8-sig"))
    except OSError:
        found = LimitsInFile("none", ())
    burst = run.model.limits.burst if run.model.limits is not None else None
    rec = report.recommendation
    if rec.concurrency is None:
        return "recommendation: none\n" + rec.to_toml() + "\n"
    if found.style == "none":
        head = "recommendation (add to the run file, e.g. at its end):"
        return f"{head}\n{rec.to_toml('table', burst=burst)}\n"
    what = "the limits under [model]" if found.style == "inline" else "the [model.limits] table"
    head = f"recommendation: replace {run.path}:{_span(found.lines)} ({what}) with:"
    return f"{head}\n{rec.to_toml(found.style, burst=burst)}\n"


def _outputs(report: BenchReport, run: RunFile, args: argparse.Namespace) -> None:
    sys.stdout.write(report.to_table() + "\n\n")
    sys.stdout.write(recommendation_text(report, run))
    json_path = Path(args.json) if args.json else None
    if json_path is not None:
        _write(json_path, report.to_json(indent=2) + "\n")
    if args.html:
        html_path = Path(args.html)
    elif json_path is not None:
        html_path = json_path.with_suffix(".html")
    else:
        html_path = run.output_dir / "bench.html"
    _write(html_path, report.to_html())
    written = [str(p) for p in (json_path, html_path) if p is not None]
    sys.stderr.write(f"wrote {', '.join(written)}\n")


async def run_bench(run: RunFile, args: argparse.Namespace, open_adapter: OpenAdapter) -> int:
    """``bench RUN.toml``: 0 when something was measured, 1 when nothing was answered
    (a fatal provider error propagates; bad input raises `ConfigError`)."""
    settings = _settings(args)
    spec = run.model
    price: Price | None = (run.budget or Budget()).price_table().get(run.prompt.model)
    plan = plan_bench(
        run.prompt, run.train, settings=settings, limits=spec.limits, retry=spec.retry, price=price
    )
    resolve(spec.adapter, "adapter")
    if args.dry_run:
        sys.stdout.write(json.dumps(plan, indent=2) + "\n")
        return 0
    progress = _Progress(sys.stderr, enabled=args.log_mode == "progress")
    if progress.enabled:
        bound = plan["max_cost_usd"]
        sys.stderr.write(
            f"bench: levels {','.join(map(str, settings.concurrency))}; at most "
            f"{plan['max_attempts'] or 'unbounded'} requests"
            + (f", at most ${bound:.4f}" if bound is not None else "")
            + "\n"
        )
    async with AsyncExitStack() as stack:
        adapter = await open_adapter(stack, _sized(spec, max(settings.concurrency)))
        report = await bench_endpoint(
            adapter,
            run.prompt,
            run.train,
            settings=settings,
            limits=spec.limits,
            retry=spec.retry,
            price=price,
            on_progress=progress,
        )
    _outputs(report, run, args)
    if report.answered == 0:
        sys.stderr.write(f"failed: no request was answered ({report.stopped or 'no level ran'})\n")
        return 1
    return 0
