"""The command line: ``textgrad optimize | evaluate | bench RUN.toml``.

Exit codes: 0 done, 1 failed, 2 bad input (run file, dataset, limits), 130 interrupted.
Progress goes to stderr (a live line on a terminal, periodic lines otherwise);
``--json-logs`` prints structured events as JSON lines instead, ``--quiet`` only errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

from ._bench_cli import add_bench_arguments, run_bench
from ._budget import Budget, BudgetMeter, Price
from ._cache import Cache
from ._console import StatusLine
from ._endpoint import Endpoint, estimate_tokens
from ._errors import ConfigError, EngineError
from ._evaluate import Outcome, evaluate
from ._events import Event
from ._prompt import Prompt
from ._redact import redact_event, redact_text
from ._runfile import EndpointSpec, RunFile, load_run_file, resolve
from ._trainer import optimize

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _configure_logging(mode: str) -> None:
    """The CLI is an application: it, not the library, decides where events go."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if mode == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    level = {"json": logging.DEBUG, "quiet": logging.ERROR}.get(mode, logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class _Progress:
    """Turns progress events into a status line on stderr."""

    def __init__(
        self,
        stream: TextIO,
        endpoints: Sequence[tuple[Endpoint, Price | None]],
        enabled: bool,
    ) -> None:
        self.status = StatusLine(stream)
        self.endpoints = endpoints  # each with the price of the model it serves, if known
        self.enabled = enabled
        self.tty = self.status.tty
        self.started = time.monotonic()
        self.last_line = 0.0

    def __call__(self, event: Event) -> None:
        if not self.enabled:
            return
        data = event.data
        if event.name == "evaluation.progress":
            now = time.monotonic()
            if not self.tty and now - self.last_line < 5.0:
                return
            self.last_line = now
            done, total = int(data.get("done", 0)), data.get("total")
            elapsed = max(float(data.get("elapsed", 0.0)), 1e-9)
            rate = done / elapsed
            eta = f"{(total - done) / rate:.0f}s" if total and rate > 0 else "?"
            stats = [(e.statistics(), price) for e, price in self.endpoints]
            limited = sum(s.rate_limited for s, _ in stats)
            priced = [price.cost(s.usage) for s, price in stats if price is not None]
            cost = f"${sum(priced):.4f}" if len(priced) == len(stats) else "$?"
            line = (
                f"{done}/{total or '?'} examples  {data.get('calls', 0) / elapsed:.1f} calls/s  "
                f"429s {limited}  cache hits {data.get('cache_hits', 0)}  "
                f"tokens {data.get('tokens', 0)}  cost {cost}  errors {data.get('errors', 0)}  "
                f"ETA {eta}"
            )
            self._write(line)
        elif event.name == "optimize.step":
            val = data.get("val_score")
            self._write(
                f"step {data.get('step')}: best train {data.get('best_score'):.3f}"
                + (f", val {val:.3f}" if isinstance(val, float) else "")
                + f", {data.get('proposals')} proposal(s)",
                final=True,
            )

    def _write(self, line: str, *, final: bool = False) -> None:
        self.status.write(line, final=final)


def _prices(run: RunFile) -> dict[str, Price]:
    return (run.budget or Budget()).price_table()


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: outputs hold prompts and data."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


async def _open(stack: AsyncExitStack, spec: EndpointSpec) -> Any:
    """Build an adapter; if it holds resources (``async with``), the stack closes it."""
    adapter = spec.build()
    if hasattr(adapter, "__aenter__"):
        adapter = await stack.enter_async_context(adapter)
    return adapter


async def _endpoint(stack: AsyncExitStack, spec: EndpointSpec) -> Endpoint:
    model = await _open(stack, spec)
    limits = spec.limits or getattr(model, "limits", None)
    return Endpoint(model, limits=limits, retry=spec.retry)


@asynccontextmanager
async def _cache(run: RunFile) -> AsyncIterator[Cache]:
    if run.cache_path is None:
        yield Cache()
        return
    async with Cache.sqlite(str(run.cache_path), flush_interval=run.cache_flush_interval) as cache:
        yield cache


def _plan(run: RunFile, command: str) -> dict[str, Any]:
    """Upper bounds of the calls a run can make, and what they may cost."""
    n, v = len(run.train), len(run.val or [])
    if command == "evaluate":
        calls = n
    else:
        t = run.trainer
        b = int(t.get("batch_size", 4))
        k = int(t.get("max_proposals_per_step", 5)) * int(t.get("parallel_proposals", 1))
        steps = math.ceil(n / b)
        # per attempt: b gradients + 1 apply (optimizer) + b batch + n full (task)
        calls = n + v + 2 + steps * (k * (2 * b + 1 + n) + v)
    sample = run.prompt.render(run.train[0].inputs)
    per_call = estimate_tokens(sample, int(run.prompt.params.get("max_tokens", 256)))
    names = [run.prompt.model]
    if run.optimizer is not None and run.optimizer.model_name:
        names.append(run.optimizer.model_name)
    BudgetMeter(run.budget, names)  # a money budget without prices fails here, as in a run
    price = _prices(run).get(run.prompt.model)
    cost = calls * per_call * price.input_per_million / 1e6 if price is not None else None
    return {
        "command": command,
        "train_examples": n,
        "val_examples": v,
        "max_calls": calls,
        "tokens_per_call_estimate": per_call,
        "max_cost_usd_estimate": cost,
        "note": "upper bound before cache hits and racing; a resumed run pays only for misses",
    }


async def _run_optimize(run: RunFile, args: argparse.Namespace) -> int:
    out_dir = Path(args.out) if args.out else run.output_dir
    if run.optimizer is None:
        raise ConfigError(f"{run.path}: [optimizer] is required for optimize")
    async with AsyncExitStack() as stack:
        task = await _endpoint(stack, run.model)
        opt = await _endpoint(stack, run.optimizer)
        cache = await stack.enter_async_context(_cache(run))
        prices = _prices(run)
        progress = _Progress(
            sys.stderr,
            [
                (task, prices.get(run.prompt.model)),
                (opt, prices.get(run.optimizer.model_name or "")),
            ],
            enabled=args.log_mode == "progress",
        )
        result = await optimize(
            run.prompt,
            run.train,
            valset=run.val,
            metric=run.build_metric(),
            model=task,
            optimizer_model=opt,
            optimizer_model_name=run.optimizer.model_name,
            cache=cache,
            budget=run.budget,
            on_event=progress,
            **run.trainer,
        )
    report = result.report
    _write_private(out_dir / "best_prompt.json", json.dumps(result.prompt.to_dict(), indent=2))
    _write_private(out_dir / "report.json", redact_text(report.to_json()))
    _write_private(out_dir / "report.md", redact_text(report.to_markdown()))
    _write_private(out_dir / "report.html", redact_text(report.to_html()))
    try:
        report.plot(out_dir / "scores.png")
    except ImportError:
        sys.stderr.write(
            "matplotlib is not installed: no plot (pip install 'textgrad-engine[plot]')\n"
        )
    sys.stdout.write(
        json.dumps(
            {
                "score": result.score,
                "val_score": result.val_score,
                "initial_score": report.initial_score,
                "stopped_reason": report.stopped_reason,
                "calls": report.calls,
                "output": str(out_dir),
            }
        )
        + "\n"
    )
    return EXIT_OK


def _load_prompt(path: str) -> Prompt:
    try:
        return Prompt.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--prompt {path}: {exc}") from None


async def _run_evaluate(run: RunFile, args: argparse.Namespace) -> int:
    prompt = args.prompt_override or run.prompt
    data = run.val if args.split == "val" else run.train
    if data is None:
        raise ConfigError(f"{run.path}: no [data].val to evaluate")
    out_path = Path(args.out) if args.out else run.output_dir / f"evaluation_{args.split}.jsonl"
    out_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as sink:

        def stream(outcome: Outcome) -> None:
            sink.write(json.dumps(outcome.to_dict(), ensure_ascii=False) + "\n")

        async with AsyncExitStack() as stack:
            task = await _endpoint(stack, run.model)
            cache = await stack.enter_async_context(_cache(run))
            if run.batch is not None:
                # Bulk first: the Batch API fills the cache at half price; whatever it
                # could not answer is paid below through the normal, limited path.
                bulk = await _open(stack, run.batch)
                filled = await bulk.prefill(prompt, data, cache=cache)
                sys.stderr.write(
                    f"batch: {filled.filled} of {filled.submitted} filled "
                    f"({filled.failed} failed, {filled.expired} expired, "
                    f"{filled.already_cached} already cached)\n"
                )
            progress = _Progress(
                sys.stderr,
                [(task, _prices(run).get(prompt.model))],
                enabled=args.log_mode == "progress",
            )
            result = await evaluate(
                prompt,
                data,
                model=task,
                metric=run.build_metric(),
                cache=cache,
                on_event=progress,
                on_outcome=stream,
                keep_outcomes=False,
                progress_interval=0.5,
            )
    summary = result.to_dict()
    summary["output"] = str(out_path)
    sys.stdout.write(json.dumps(summary) + "\n")
    return EXIT_OK if result.errors == 0 else EXIT_FAILED


def _log_options(parser: argparse.ArgumentParser) -> None:
    logs = parser.add_mutually_exclusive_group()
    logs.add_argument("--quiet", dest="log_mode", action="store_const", const="quiet")
    logs.add_argument("--json-logs", dest="log_mode", action="store_const", const="json")
    parser.set_defaults(log_mode="progress")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgrad", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("optimize", "optimize the run file's prompt with text gradients"),
        ("evaluate", "score a prompt on a dataset, one JSON line per example"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_file", help="the TOML run file")
        p.add_argument("--out", help="output folder (optimize) or JSONL file (evaluate)")
        p.add_argument("--dry-run", action="store_true", help="validate and plan; call nothing")
        _log_options(p)
        if name == "evaluate":
            p.add_argument("--prompt", help="a prompt JSON file (e.g. best_prompt.json)")
            p.add_argument("--split", choices=("train", "val"), default="train")
    bench = sub.add_parser(
        "bench",
        help="measure the run file's endpoint: rate, limits, latency, cost; recommend limits",
    )
    add_bench_arguments(bench)
    _log_options(bench)
    return parser


async def _main(args: argparse.Namespace, run: RunFile) -> int:
    if args.command == "bench":
        return await run_bench(run, args, _open)
    if args.dry_run:
        for spec in (run.model, run.optimizer):
            if spec is not None:
                resolve(spec.adapter, "adapter")
        run.build_metric()
        sys.stdout.write(json.dumps(_plan(run, args.command), indent=2) + "\n")
        return EXIT_OK
    if args.command == "optimize":
        return await _run_optimize(run, args)
    return await _run_evaluate(run, args)


def _bench_simulated(arguments: list[str]) -> int:
    """``bench --simulated``: the engine-vs-peers harness in ``benchmarks/throughput.py``.

    The harness is not part of the installed package (it imports adapters and peers'
    patterns); it is resolved at run time and found from a source checkout's root.
    """
    try:
        harness = resolve("benchmarks.throughput:main", "bench --simulated")
    except ConfigError as exc:
        sys.stderr.write(
            f"error: {exc}\nbench --simulated runs benchmarks/throughput.py, which ships with "
            "the source checkout, not the installed package: run it from the repository "
            "root (python -m engine bench --simulated ...), or python benchmarks/throughput.py\n"
        )
        return EXIT_BAD_INPUT
    return int(harness(arguments))


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"] and "--simulated" in arguments[1:]:
        return _bench_simulated([a for a in arguments[1:] if a != "--simulated"])
    args = _parser().parse_args(arguments)
    _configure_logging(args.log_mode)
    try:
        # Run files, datasets and prompt files are read before the event loop starts.
        run = load_run_file(args.run_file)
        args.prompt_override = _load_prompt(args.prompt) if getattr(args, "prompt", None) else None
        return anyio.run(_main, args, run)
    except KeyboardInterrupt:
        resume = (
            "" if args.command == "bench" else "; rerun the same command to resume from the cache"
        )
        sys.stderr.write(f"interrupted{resume}\n")
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_BAD_INPUT
    except EngineError as exc:
        sys.stderr.write(f"failed: {type(exc).__name__}: {exc}\n")
        return EXIT_FAILED
