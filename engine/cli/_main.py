"""The command line: ``textgrad optimize | evaluate | bench RUN.toml``.

Exit codes: 0 done, 1 failed, 2 bad input (run file, dataset, limits), 130 interrupted
(Ctrl-C or SIGTERM: the run is cancelled, the cache flushed, a rerun resumes).
Progress goes to stderr (a live line on a terminal, periodic lines otherwise);
``--json-logs`` prints structured events as JSON lines instead, ``--quiet`` only errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Mapping, MutableMapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, TextIO

import anyio
import structlog

from .._budget import Budget, Price
from .._errors import (
    BudgetExceededError,
    ConfigError,
    ConnectionFailedError,
    EndpointUnreachableError,
    GlobalMetricError,
    TooManyErrorsError,
)
from .._evaluate import Evaluation, Outcome, evaluate
from .._events import Event
from .._prompt import Prompt
from .._redact import redact_event, redact_text
from ..cache import Cache, PostgresStore
from ..cluster import FileDataset, RayCluster
from ..endpoint import Endpoint, EndpointStatistics
from ..report import RunReport
from ..training import OptimizationResult, optimize, preflight_global_metric
from ._bench import add_bench_arguments, run_bench
from ._console import StatusLine
from ._exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, exit_code_of
from ._outputs import make_output_dir, replacing, replacing_path, write_private
from ._plan import plan, plan_table
from ._preflight import Job, dry_run_endpoints, prepare, source_line
from ._runfile import ClusterSpec, EndpointSpec, RunFile, endpoint_url, load_run_file, resolve
from ._signals import Termination
from ._tracking import add_otel_argument, listen, mlflow_logger, start_otel

__all__ = ["main"]

_METRIC_THREADS = 16  # evaluate()'s default, when [metric] threads is not given


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
            *([] if mode == "json" else [_drop_reported_failures]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _drop_reported_failures(
    _logger: Any, _name: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """The CLI prints a failed evaluation's error itself (``failed: ...``): once."""
    if event.get("event") == "evaluation.failed":
        raise structlog.DropEvent
    return event


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
            line += _concurrency([s for s, _ in stats]) + _truncated(data)
            self._write(line + _per_worker(data.get("workers"), rate))
        elif event.name == "endpoint.paused" and float(data.get("seconds", 0.0)) >= 1.0:
            self._write(
                f"paused by the provider until {data.get('until')} "
                f"({float(data.get('seconds', 0.0)):.0f}s, {data.get('reason')}; "
                f"endpoint {data.get('endpoint')})",
                final=True,
            )
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


def _concurrency(stats: Sequence[EndpointStatistics]) -> str:
    """The adaptive level of each endpoint below its ceiling (what a queueing server
    takes), or ''."""
    parts = []
    for s in stats:
        level, ceiling = s.limiter.level, s.limiter.concurrency
        if level is not None and level < ceiling:
            serves = f", serves ~{s.limiter.serves:.0f}" if s.limiter.serves else ""
            parts.append(f"{s.name} {level}/{ceiling}{serves}")
    return f"  concurrency {'; '.join(parts)}" if parts else ""


def _truncated(data: Mapping[str, Any]) -> str:
    """The answers cut at the length cap so far, and what to do about it, or ''."""
    cut, done = int(data.get("truncated") or 0), int(data.get("done") or 0)
    if not cut:
        return ""
    return (
        f"  {cut} of {done} answers cut at the length limit: set max_tokens or tell the "
        "prompt to be brief"
    )


def _per_worker(workers: Any, total_rate: float) -> str:
    """A cluster's progress: each worker's examples per second, then the total."""
    if not isinstance(workers, list) or not workers:
        return ""
    each = " ".join(f"w{w.get('worker')} {float(w.get('per_s', 0.0)):.1f}/s" for w in workers)
    return f"  workers: {each} (total {total_rate:.1f}/s)"


def _metric_options(run: RunFile) -> dict[str, Any]:
    """What the run file says about scoring, as `evaluate` and `optimize` take it."""
    return {
        "metric": run.build_metric(),
        "global_metric": run.build_global_metric(),
        "metric_timeout": run.metric_timeout,
        "metric_threads": run.metric_threads or _METRIC_THREADS,
    }


def _prices(run: RunFile) -> dict[str, Price]:
    return (run.budget or Budget()).price_table()


async def _open(stack: AsyncExitStack, spec: EndpointSpec) -> Any:
    """Build an adapter; if it holds resources (``async with``), the stack closes it."""
    adapter = spec.build()
    if hasattr(adapter, "__aenter__"):
        adapter = await stack.enter_async_context(adapter)
    return adapter


async def _endpoint(stack: AsyncExitStack, spec: EndpointSpec) -> Endpoint:
    model = await _open(stack, spec)
    limits = spec.limits or getattr(model, "limits", None)
    return Endpoint(model, limits=limits, retry=spec.retry, namespace=spec.cache_namespace)


@asynccontextmanager
async def _cache(run: RunFile) -> AsyncIterator[Cache]:
    if run.cache_url is not None:  # shared by every worker: [cache] url = "postgresql://..."
        store = PostgresStore(
            run.cache_url, table=run.cache_table, flush_interval=run.cache_flush_interval
        )
        async with Cache(store) as cache:
            yield cache
        return
    if run.cache_path is None:
        yield Cache()
        return
    async with Cache.sqlite(str(run.cache_path), flush_interval=run.cache_flush_interval) as cache:
        yield cache


async def _program_models(
    stack: AsyncExitStack, run: RunFile, task: Endpoint
) -> dict[str, Endpoint] | None:
    """A program's endpoint per prompt: ``[model]``, or the ``[adapters.NAME]`` its
    ``[prompts.NAME] adapter`` names (each opened once); None for one prompt."""
    if run.prompts is None:
        return None
    opened = {
        name: await _endpoint(stack, run.adapters[name])
        for name in set(run.prompt_adapters.values())
    }
    return {
        name: opened[run.prompt_adapters[name]] if name in run.prompt_adapters else task
        for name in run.prompts
    }


# [trainer] keys the run file validates but optimize() does not take yet on this branch;
# they reach it once the trainer grows them (filtered here, never silently dropped there).
def _print_json(summary: dict[str, Any], notes: dict[str, str]) -> None:
    """One JSON line on stdout.  NaN and infinities are not JSON: they become ``null``
    with a ``<key>_note`` saying why there is no number."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            out[f"{key}_note"] = notes.get(key, "no number: nothing was scored")
        else:
            out[key] = value
    sys.stdout.write(json.dumps(out, allow_nan=False) + "\n")


async def _optimize(
    run: RunFile, args: argparse.Namespace, job: Job, cluster: RayCluster | None
) -> OptimizationResult:
    assert run.optimizer is not None  # prepare() checked it
    assert not isinstance(job.data, FileDataset)  # the trainer holds its training set
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
        tracker = mlflow_logger(run, job.out)  # [tracking] mlflow: None without it
        models = await _program_models(stack, run, task)
        program = {} if models is None else {"program": run.build_program()}
        result = await optimize(
            job.prompts or job.prompt,
            job.data,
            valset=run.val,
            **_metric_options(run),
            **program,
            model=models or task,
            optimizer_model=opt,
            optimizer_model_name=run.optimizer.model_name,
            cache=cache,
            budget=run.budget,
            on_event=listen(progress, tracker),
            cluster=cluster,
            **run.trainer,
        )
        if tracker is not None:  # before report.json is written: it names the MLflow run
            tracker.log_report(result.report)
        return result


def _write_optimize_outputs(out: Path, result: OptimizationResult) -> None:
    report = result.report
    best = (
        {name: p.to_dict() for name, p in result.prompts.items()}  # a program: every prompt
        if result.prompts
        else result.prompt.to_dict()
    )
    write_private(out / "best_prompt.json", json.dumps(best, indent=2))
    write_private(out / "report.json", redact_text(report.to_json()))
    write_private(out / "report.md", redact_text(report.to_markdown()))
    write_private(out / "report.html", redact_text(report.to_html()))
    try:
        with replacing_path(out / "scores.png") as temp:
            report.plot(temp)
    except ImportError:
        sys.stderr.write(
            "matplotlib is not installed: no plot (pip install 'textgrad-engine[plot]')\n"
        )


def _unscored(report: RunReport) -> str:
    """Why an optimization ended with no score at all."""
    return f"no training example was scored, every one errored (stopped: {report.stopped_reason})"


def _stopped_unscored(reason: str) -> int:
    """An optimization that ends with no prompt to ship: JSON with nulls, exit 1."""
    nothing = math.nan  # printed as null with a note, like any missing score
    summary = {"score": nothing, "initial_score": nothing, "stopped_reason": reason, "output": None}
    _print_json(summary, {"score": reason, "initial_score": "see score_note"})
    sys.stderr.write(f"failed: {reason}\n")
    return EXIT_FAILED


async def _run_optimize(
    run: RunFile, args: argparse.Namespace, job: Job, cluster: RayCluster | None
) -> int:
    created = not job.out.exists()
    make_output_dir(job.out, job.out_option)
    try:
        return _finish_optimize(job, await _optimize(run, args, job, cluster))
    except BudgetExceededError as exc:  # before the initial prompt had a score
        return _stopped_unscored(
            f"the run stopped before its first evaluation finished (budget: {exc.message}); "
            "no prompt was scored: raise the budget"
        )
    except TooManyErrorsError as exc:
        return _stopped_unscored(f"error rate: {exc.message}")
    finally:
        if created:  # leave no empty folder behind a run that wrote nothing
            with contextlib.suppress(OSError):
                job.out.rmdir()  # only ever removes an empty folder


def _finish_optimize(job: Job, result: OptimizationResult) -> int:
    report = result.report
    summary: dict[str, Any] = {
        "score": result.score,
        "val_score": result.val_score,
        "initial_score": report.initial_score,
        "stopped_reason": report.stopped_reason,
        "calls": report.calls,
        "cost_usd": report.cost,
        **({"hedges": report.hedges} if report.hedges else {}),  # only where a model hedged
        "output": str(job.out),
    }
    if math.isnan(result.score):
        # nothing measured: no best prompt to ship, and the last good outputs stay
        reason = _unscored(report)
        notes = {"score": reason, "initial_score": "see score_note"}
        _print_json({**summary, "output": None}, notes)
        sys.stderr.write(f"failed: {reason}\n")
        return EXIT_FAILED
    _write_optimize_outputs(job.out, result)
    _print_json(summary, {"val_score": "no validation example was scored, every one errored"})
    return EXIT_OK


def _load_prompt(path: str) -> Prompt:
    try:
        return Prompt.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--prompt {path}: {exc}") from None


async def _evaluate(
    run: RunFile, args: argparse.Namespace, job: Job, sink: TextIO, cluster: RayCluster | None
) -> Evaluation:
    def stream(outcome: Outcome) -> None:
        sink.write(json.dumps(outcome.to_dict(), ensure_ascii=False) + "\n")

    async with AsyncExitStack() as stack:
        task = await _endpoint(stack, run.model)
        cache = await stack.enter_async_context(_cache(run))
        if run.batch is not None:
            # Bulk first: the Batch API fills the cache at half price; whatever it
            # could not answer is paid below through the normal, limited path.
            assert not isinstance(job.data, FileDataset)  # [batch] loads the data
            bulk = await _open(stack, run.batch)
            filled = await bulk.prefill(job.prompt, job.data, cache=cache, model=task)
            sys.stderr.write(
                f"batch: {filled.filled} of {filled.submitted} filled "
                f"({filled.failed} failed, {filled.expired} expired, "
                f"{filled.already_cached} already cached)\n"
            )
        progress = _Progress(
            sys.stderr,
            [(task, _prices(run).get(job.prompt.model))],
            enabled=args.log_mode == "progress",
        )
        streamed = isinstance(job.data, FileDataset)
        models = await _program_models(stack, run, task)
        program = {} if models is None else {"program": run.build_program()}
        return await evaluate(
            job.prompts or job.prompt,
            job.data,
            **program,
            model=models or task,
            **_metric_options(run),
            # a streamed file can only use a cache every worker opens ([cache] url)
            cache=None if streamed and run.cache_url is None else cache,
            on_event=progress,
            on_outcome=stream,
            keep_outcomes=False,
            progress_interval=0.5,
            cluster=cluster,
        )


async def _run_evaluate(
    run: RunFile, args: argparse.Namespace, job: Job, cluster: RayCluster | None
) -> int:
    make_output_dir(job.out.parent, job.out_option)
    # The old file stays whole until this run has written every outcome.
    with replacing(job.out) as sink:
        result = await _evaluate(run, args, job, sink, cluster)
    summary = result.to_dict()
    summary["output"] = str(job.out)
    _print_json(
        summary,
        {
            "score": f"no example was scored: {result.errors} of {result.completed} errored "
            f"(each error is in {job.out})"
        },
    )
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
        p.add_argument(
            "--cluster",
            metavar="ADDRESS",
            help="run on a Ray cluster: local, auto or ray://host:port (overrides [cluster])",
        )
        p.add_argument(
            "--workers", type=_positive, metavar="N", help="cluster workers (overrides [cluster])"
        )
        _log_options(p)
        add_otel_argument(p)
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


def _quiet_ray_data() -> None:
    """Ray Data logs every dataset it runs at INFO on the console; the CLI has its own
    progress line.  (An application's choice: the library leaves logging alone.)"""
    from ..cluster._ray import ray_data_module

    ray_data_module()  # its logging is configured on import: set the level after it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # "progress bars disabled": the engine turns them off on purpose
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _cluster_spec(run: RunFile, args: argparse.Namespace) -> ClusterSpec | None:
    """``[cluster]``, with ``--cluster`` and ``--workers`` over it; None: run here."""
    address, workers = getattr(args, "cluster", None), getattr(args, "workers", None)
    if address is None and workers is None and run.cluster is None:
        return None
    spec = run.cluster or ClusterSpec()
    return ClusterSpec(address=address or spec.address, workers=workers or spec.workers)


async def _main(args: argparse.Namespace, run: RunFile, job: Job | None) -> int:
    if args.command == "bench":
        return await run_bench(run, args, _open)
    assert job is not None  # _prepare made one for optimize and evaluate
    if args.dry_run:
        await _check_global_metric(run, job)
        summary = {**plan(run, args.command), "endpoints": dry_run_endpoints(run)}
        for name, url in summary["endpoints"].items():
            sys.stderr.write(f"[{name}] calls {url}\n")
        sys.stderr.write(plan_table(summary))
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return EXIT_OK
    spec = _cluster_spec(run, args)
    async with AsyncExitStack() as stack:
        cluster = None
        if spec is not None:
            pool = RayCluster(spec.address, workers=spec.workers)
            cluster = await stack.enter_async_context(pool)
            _quiet_ray_data()
        if args.command == "optimize":
            return await _run_optimize(run, args, job, cluster)
        return await _run_evaluate(run, args, job, cluster)


async def _check_global_metric(run: RunFile, job: Job) -> None:
    """The dry run tries ``[metric] global`` on the metric's results for the first rows'
    expected answers (all, one, each side alone), as `optimize` does before its first call:
    a naive F1 that divides by zero fails here, before anything is paid."""
    if run.global_metric_spec is None or not isinstance(job.data, list):
        return
    try:
        await preflight_global_metric(run.build_metric(), run.build_global_metric(), job.data)
    except GlobalMetricError as exc:
        raise ConfigError(f"{run.path}: [metric] global: {exc.message}") from None


def _prepare(args: argparse.Namespace) -> tuple[RunFile, Job | None]:
    """Read and check everything before the event loop starts: run file, datasets,
    prompt file, metric, outputs (bench checks its own)."""
    run = load_run_file(args.run_file, load_data=False)
    if args.command == "bench":
        return load_run_file(args.run_file), None
    # A cluster evaluation streams its file past the driver, unless the cache is an
    # SQLite file (only the driver writes it: then the driver holds the rows, as here).
    streamed = (
        args.command == "evaluate"
        and not args.dry_run
        and _cluster_spec(run, args) is not None
        and run.batch is None
        and run.cache_path is None
    )
    if not streamed:
        run = load_run_file(args.run_file)
    prompt_path = getattr(args, "prompt", None)
    job = prepare(
        run,
        args.command,
        out=args.out,
        split=getattr(args, "split", "train"),
        prompt=_load_prompt(prompt_path) if prompt_path else None,
        prompt_path=prompt_path,
        check_keys=True,  # a dry run that passes must not fail at the first call
    )
    return run, job


def _unreachable(run: RunFile) -> str:
    """Where the URLs a run calls are configured, and the fix, for a refused connection."""
    lines = []
    for name, spec in (("model", run.model), ("optimizer", run.optimizer), ("batch", run.batch)):
        url = endpoint_url(spec) if spec is not None else None
        if url is None:
            continue
        own = "base_url" in (run.raw.get(name, {}).get("options") or {})
        section = name if own else "model"
        where = source_line(run, [section, "options"])
        lines.append(f"  [{name}] calls {url}, set at {where} [{section}] options.base_url")
    if not lines:
        return ""
    return "\n".join([*lines, "  fix: start the server, or correct the host and port there"]) + "\n"


def _bench_simulated(arguments: list[str], harness_spec: str = "benchmarks.throughput:main") -> int:
    """``bench --simulated``: the engine-vs-peers harness in ``benchmarks/throughput.py``;
    ``bench --client-cpu``: client CPU per request in ``benchmarks/client_cpu.py``.

    The harnesses are not part of the installed package (they import adapters and
    peers' patterns); they are resolved at run time from a source checkout's root.
    """
    try:
        harness = resolve(harness_spec, "bench")
    except ConfigError as exc:
        sys.stderr.write(
            f"error: {exc}\nthis bench runs {harness_spec.split(':')[0].replace('.', '/')}.py, "
            "which ships with the source checkout, not the installed package: run it from "
            "the repository root\n"
        )
        return EXIT_BAD_INPUT
    return int(harness(arguments) or 0)


async def _main_until_terminated(
    args: argparse.Namespace, run: RunFile, job: Job | None, termination: Termination
) -> int:
    """`_main`, cancelled like Ctrl-C when SIGTERM arrives (`Termination`)."""
    with termination.watching():
        return await _main(args, run, job)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["cache"]:
        from ._cache import main as cache_main  # its own parser: `cache copy SRC DST`

        return cache_main(arguments[1:])
    if arguments[:1] == ["bench"] and "--simulated" in arguments[1:]:
        return _bench_simulated([a for a in arguments[1:] if a != "--simulated"])
    if arguments[:1] == ["bench"] and "--client-cpu" in arguments[1:]:
        rest = [a for a in arguments[1:] if a != "--client-cpu"]
        return _bench_simulated(rest, "benchmarks.client_cpu:main")
    args = _parser().parse_args(arguments)
    _configure_logging(args.log_mode)
    start_otel(args)
    termination = Termination()

    def run() -> int:
        run_file, job = _prepare(args)
        try:
            return int(anyio.run(_main_until_terminated, args, run_file, job, termination))
        except asyncio.CancelledError:
            if termination.received:  # SIGTERM: the same end as Ctrl-C
                raise KeyboardInterrupt from None
            raise
        except (ConnectionFailedError, EndpointUnreachableError) as exc:
            sys.stderr.write(f"failed: {type(exc).__name__}: {exc}\n{_unreachable(run_file)}")
            return EXIT_FAILED

    resume = "" if args.command == "bench" else "; rerun the same command to resume from the cache"
    return exit_code_of(run, interrupted=f"interrupted{resume}")
