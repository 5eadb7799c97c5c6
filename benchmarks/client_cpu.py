"""Client CPU per request against an instant OpenAI-compatible server (issue #11's table).

One server process (a minimal ASGI echo app on uvicorn, uvloop + httptools where
installed, no rate limit, latency 0; or ``--server simulated`` for the simulated
provider); then each client, one after another, in its own process: a warm-up of
``--warmup`` requests, then ``--n`` requests at ``--concurrency`` in flight.  CPU is the
client process's user + sys time (``resource.getrusage`` in the child) over the timed
requests only; requests/s is over the same span.  Rows repeat ``--repeat`` times,
interleaved, and the table shows the range.

    python benchmarks/client_cpu.py                         # the whole table, ~3 minutes
    python benchmarks/client_cpu.py --rows engine aiohttp --repeat 5
    python benchmarks/client_cpu.py --rows engine --profile engine.prof   # + cProfile
    python benchmarks/client_cpu.py --codecs                # orjson vs msgspec vs json

Rows: ``engine`` (`evaluate` through `OpenAIChat`, aiohttp transport, a trivial metric,
no cache), ``engine+memcache`` (the same with a memory cache, cold), ``engine-sdk``
(``transport="sdk"``), ``openai-create`` (the SDK's typed create on httpx2),
``openai-aiohttp`` (the SDK on ``openai.DefaultAioHttpClient``), ``httpx2`` (plain
post), ``aiohttp`` (plain session post, orjson like the engine), and the uvloop
variants ``engine@uvloop`` and ``aiohttp@uvloop``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from adapters.simulated_server import wait_until_listening

ROWS = (
    "engine",
    "engine:def",
    "engine:async",
    "engine+memcache",
    "engine-sdk",
    "openai-create",
    "openai-aiohttp",
    "httpx2",
    "aiohttp",
    "engine@uvloop",
    "aiohttp@uvloop",
)
LABELS = {
    "engine": "engine `evaluate` through `OpenAIChat` (aiohttp transport, no cache), "
    "built-in `ExactMatch()`",
    "engine:def": "the same, the metric a plain `def metric(example, prediction)`",
    "engine:async": "the same, the metric a plain `async def metric(example, prediction)`",
    "engine+memcache": "the same with a memory cache (cold: every request a miss)",
    "engine-sdk": 'engine through `OpenAIChat(transport="sdk")` (SDK generic POST on httpx2)',
    "openai-create": "openai `chat.completions.create` on httpx2",
    "openai-aiohttp": "openai on `openai.DefaultAioHttpClient`",
    "httpx2": "plain `httpx2.AsyncClient.post`",
    "aiohttp": "plain `aiohttp` session post (orjson)",
    "engine@uvloop": "engine (aiohttp transport) on uvloop",
    "aiohttp@uvloop": "plain `aiohttp` on uvloop",
}


def _messages(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Echo."}, {"role": "user", "content": f"item {i}"}]


# -- the instant server -------------------------------------------------------------------
def serve(port: int) -> None:
    """A minimal OpenAI-compatible echo server: answers every POST at once."""
    import orjson
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        request = orjson.loads(b"".join(chunks))
        answer = request["messages"][-1]["content"]
        body = orjson.dumps(
            {
                "id": "chatcmpl-instant",
                "object": "chat.completion",
                "created": 0,
                "model": request.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": answer},
                    }
                ],
                "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
            }
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="critical",
        access_log=False,
        lifespan="off",
        loop="auto",
        http="auto",
        backlog=4096,
    )


@contextlib.contextmanager
def server_process(kind: str) -> Iterator[str]:
    """The server in its own process; yields the ``/v1`` root."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if kind == "minimal":
        args = [sys.executable, __file__, "--serve", str(port)]
    else:
        args = [sys.executable, "-m", "adapters.simulated_server", "--port", str(port), "--fast"]
    proc = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(10)


# -- the clients --------------------------------------------------------------------------
One = Callable[[int], Awaitable[None]]


async def _pool(start: int, n: int, concurrency: int, one: One) -> None:
    """``concurrency`` workers taking request numbers from one counter (no waves)."""
    import anyio

    numbers = iter(range(start, start + n))

    async def worker() -> None:
        for i in numbers:
            await one(i)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def _plain(
    kind: str, url: str, concurrency: int
) -> tuple[One, Callable[[], Awaitable[None]]]:
    """A request function for a plain client, and its closer."""
    headers = {"authorization": "Bearer none", "content-type": "application/json"}
    endpoint = f"{url}/chat/completions"
    if kind == "aiohttp":
        import aiohttp
        import orjson

        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))

        async def post_aiohttp(i: int) -> None:
            body = orjson.dumps({"model": "sim", "messages": _messages(i)})
            async with session.post(endpoint, data=body, headers=headers) as response:
                data = orjson.loads(await response.read())
            assert data["choices"][0]["message"]["content"] == f"item {i}"

        return post_aiohttp, session.close
    import httpx2

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    client = httpx2.AsyncClient(limits=limits)

    async def post_httpx2(i: int) -> None:
        response = await client.post(
            endpoint, json={"model": "sim", "messages": _messages(i)}, headers=headers
        )
        assert response.json()["choices"][0]["message"]["content"] == f"item {i}"

    return post_httpx2, client.aclose


async def _openai(
    kind: str, url: str, concurrency: int
) -> tuple[One, Callable[[], Awaitable[None]]]:
    import httpx2
    import openai

    if kind == "openai-aiohttp":
        http: httpx2.AsyncClient = openai.DefaultAioHttpClient()
    else:
        limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = httpx2.AsyncClient(limits=limits)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, http_client=http)

    async def create(i: int) -> None:
        response = await client.chat.completions.create(model="sim", messages=_messages(i))  # type: ignore[arg-type]
        assert response.choices[0].message.content == f"item {i}"

    return create, client.close


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _metric(variant: str) -> Any:
    """The metric of an engine row as a user writes it: the built-in, a plain function
    or a plain coroutine function (no ``inline`` attribute: what users get)."""
    from engine import Example
    from engine.metrics import ExactMatch

    def plain(example: Example, prediction: str) -> float:
        return 1.0 if prediction == example.expected else 0.0

    async def plain_async(example: Example, prediction: str) -> float:
        return 1.0 if prediction == example.expected else 0.0

    return {"def": plain, "async": plain_async}.get(variant) or ExactMatch()


async def _measure_engine(
    kind: str, url: str, n: int, warmup: int, concurrency: int, profile: str | None
) -> dict[str, float]:
    kind, _, variant = kind.partition(":")
    from adapters.openai_chat import OpenAIChat
    from engine import Cache, Example, Limits, Prompt, evaluate

    metric = _metric(variant)
    prompt = Prompt(
        [{"role": "system", "content": "Echo."}, {"role": "user", "content": "{question}"}],
        model="sim",
    )

    def data(start: int, count: int) -> list[Example]:
        return [
            Example({"question": f"item {i}"}, f"item {i}", id=f"e{i}")
            for i in range(start, start + count)
        ]

    transport = "sdk" if kind == "engine-sdk" else "aiohttp"
    limits = Limits(concurrency=concurrency)
    timed = data(warmup, n)
    async with OpenAIChat(base_url=url, limits=limits, transport=transport) as chat:
        cache = Cache() if kind == "engine+memcache" else None
        await evaluate(prompt, data(0, warmup), model=chat, metric=metric, cache=cache)
        profiler = cProfile.Profile() if profile else None
        cpu, wall = _cpu(), time.perf_counter()
        if profiler:
            profiler.enable()
        result = await evaluate(prompt, timed, model=chat, metric=metric, cache=cache)
        if profiler:
            profiler.disable()
        cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    assert result.completed == n and result.score == 1.0 and result.calls == n, result
    if profiler and profile:
        profiler.dump_stats(profile)
    return {"cpu_s": cpu, "wall_s": wall}


async def _measure(
    kind: str, url: str, n: int, warmup: int, concurrency: int, profile: str | None
) -> dict[str, float]:
    base = kind.split("@")[0]
    if base.startswith("engine"):
        return await _measure_engine(base, url, n, warmup, concurrency, profile)
    if base.startswith("openai"):
        one, close = await _openai(base, url, concurrency)
    else:
        one, close = await _plain(base, url, concurrency)
    await _pool(0, warmup, concurrency, one)
    cpu, wall = _cpu(), time.perf_counter()
    await _pool(warmup, n, concurrency, one)
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    await close()
    return {"cpu_s": cpu, "wall_s": wall}


def client(kind: str, url: str, n: int, warmup: int, concurrency: int, profile: str | None) -> None:
    """One client row, in this process; prints its figures as JSON."""
    import anyio
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    options = {"use_uvloop": True} if kind.endswith("@uvloop") else {}
    out = anyio.run(_measure, kind, url, n, warmup, concurrency, profile, backend_options=options)
    out.update(
        kind=kind,
        n=n,
        requests_per_s=n / out["wall_s"],
        cpu_ms_per_request=out["cpu_s"] / n * 1000,
    )
    sys.stdout.write(json.dumps(out) + "\n")


# -- the JSON codecs ----------------------------------------------------------------------
def codecs(rounds: int = 100_000) -> list[dict[str, Any]]:
    """CPU of encoding a request body and decoding + reading a response, per codec."""
    import msgspec
    import orjson

    body = {"model": "sim", "temperature": 0.0, "messages": _messages(12345)}
    answer = json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "sim",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "item 12345"},
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
        }
    ).encode()
    encoder, decoder = msgspec.json.Encoder(), msgspec.json.Decoder()

    def read(data: Any) -> Any:
        return data["choices"][0]["message"]["content"], data.get("usage")

    cases: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
        "json (stdlib)": (lambda: json.dumps(body).encode(), lambda: read(json.loads(answer))),
        "orjson": (lambda: orjson.dumps(body), lambda: read(orjson.loads(answer))),
        "msgspec": (lambda: encoder.encode(body), lambda: read(decoder.decode(answer))),
    }
    rows = []
    for name, (encode, decode) in cases.items():
        best = []
        for fn in (encode, decode):
            runs = []
            for _ in range(5):
                cpu = time.process_time()
                for _ in range(rounds):
                    fn()
                runs.append((time.process_time() - cpu) / rounds * 1e6)
            best.append(min(runs))
        rows.append({"codec": name, "encode_us": best[0], "decode_us": best[1]})
    return rows


# -- the table ----------------------------------------------------------------------------
BEFORE = " (before)"


def _run_row(kind: str, url: str, args: argparse.Namespace, profile: str | None) -> dict[str, Any]:
    """One row in its own process; a row named ``... (before)`` imports the engine and
    adapters from ``--before`` (an older checkout) instead of this tree."""
    client_kind = kind.removesuffix(BEFORE)
    cmd = [sys.executable, __file__, "--client", client_kind, "--url", url, "--n", str(args.n)]
    cmd += ["--warmup", str(args.warmup), "--concurrency", str(args.concurrency)]
    if profile:
        cmd += ["--profile", profile]
    env = None
    if kind.endswith(BEFORE):
        env = {**os.environ, "PYTHONPATH": args.before}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"client {kind} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _span(values: Sequence[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return (
        format(low, fmt)
        if format(low, fmt) == format(high, fmt)
        else (f"{format(low, fmt)}-{format(high, fmt)}")
    )


def table(results: dict[str, list[dict[str, Any]]], rounds: list[dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| client | requests/s | CPU per request | vs plain aiohttp, same round: requests/s "
        "| CPU per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, rows in results.items():
        paired = [(r[kind], r["aiohttp"]) for r in rounds if kind in r and "aiohttp" in r]
        speed = [a["requests_per_s"] / b["requests_per_s"] for a, b in paired]
        cpu = [a["cpu_ms_per_request"] / b["cpu_ms_per_request"] for a, b in paired]
        label = LABELS[kind.removesuffix(BEFORE)] + (BEFORE if kind.endswith(BEFORE) else "")
        lines.append(
            f"| {label} | {_span([r['requests_per_s'] for r in rows], ',.0f')} | "
            f"{_span([r['cpu_ms_per_request'] for r in rows], '.3f')} ms | "
            f"{_span(speed, '.2f') if speed else '-'} | {_span(cpu, '.2f') + 'x' if cpu else '-'} |"
        )
    return "\n".join(lines)


def _print_profile(path: str, limit: int = 45) -> None:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)
    Path(path).with_suffix(".txt").write_text(out.getvalue())
    print(f"profile: {path} (text: {Path(path).with_suffix('.txt')})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--server", choices=("minimal", "simulated"), default="minimal")
    parser.add_argument("--profile", help="write a cProfile of the engine row here")
    parser.add_argument(
        "--before",
        help="an older checkout: each engine row also runs on its code, side by side",
    )
    parser.add_argument("--codecs", action="store_true", help="compare JSON codecs and exit")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    if args.client:
        return client(args.client, args.url, args.n, args.warmup, args.concurrency, args.profile)
    if args.codecs:
        print("| codec | encode a request body | decode a response and read it |")
        print("|---|---:|---:|")
        for row in codecs():
            print(f"| {row['codec']} | {row['encode_us']:.2f} us | {row['decode_us']:.2f} us |")
        return None
    print(_versions(), flush=True)
    kinds = list(args.rows)
    if args.before:
        kinds = [k for row in kinds for k in ((row, row + BEFORE) if "engine" in row else (row,))]
    results: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    rounds: list[dict[str, dict[str, Any]]] = []
    with server_process(args.server) as url:
        for round_number in range(args.repeat):
            rounds.append({})
            for kind in kinds:
                row = _run_row(kind, url, args, None)
                results[kind].append(row)
                rounds[-1][kind] = row
                print(
                    f"round {round_number + 1} {kind:>25}: {row['requests_per_s']:8.0f} req/s "
                    f"{row['cpu_ms_per_request']:.3f} ms CPU/request",
                    flush=True,
                )
        if args.profile:  # a run of its own: the profiler's cost stays out of the table
            _run_row("engine", url, args, args.profile)
    print()
    print(table(results, rounds))
    if args.profile:
        _print_profile(args.profile)
    return None


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    names = ("aiohttp", "orjson", "openai", "httpx2", "anyio", "uvloop", "uvicorn", "httptools")
    found = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{name} {version(name)}")
    return f"Python {sys.version.split()[0]}; " + ", ".join(found)


if __name__ == "__main__":
    main()
