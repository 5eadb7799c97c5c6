"""``textgrad cache ...``: cache maintenance commands.

    textgrad cache copy SRC DST     SRC and DST: a SQLite path or a postgresql:// URL

Prints a JSON summary on stdout.  Exit codes as for the other commands: 0 done,
1 failed (unreadable cache, other format, lost connection), 2 bad input (missing
file, bad URL, same cache twice), 130 interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence

import anyio

from ..cache import copy_cache, display_url, is_postgres_url
from ._exits import EXIT_OK, exit_code_of

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textgrad cache", description="cache maintenance")
    sub = parser.add_subparsers(dest="action", required=True)
    copy = sub.add_parser(
        "copy",
        help="copy every row of one cache into another (SQLite file or PostgreSQL)",
        description="Copy a cache between SQLite files and PostgreSQL, streaming rows; "
        "rows already in DST are kept, a key on both sides takes SRC's value.",
    )
    copy.add_argument("src", help="the source: a SQLite cache file or a postgresql:// URL")
    copy.add_argument("dst", help="the destination (created if absent)")
    copy.add_argument("--src-table", default="engine_cache", help="PostgreSQL table of SRC")
    copy.add_argument("--dst-table", default="engine_cache", help="PostgreSQL table of DST")
    copy.add_argument("--batch-size", type=int, default=1000, help="rows read per page")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``textgrad cache ARGS``; returns the exit code."""
    args = _parser().parse_args(list(argv))  # usage errors exit 2 through argparse
    started = time.perf_counter()
    run = functools.partial(
        copy_cache,
        args.src,
        args.dst,
        src_table=args.src_table,
        dst_table=args.dst_table,
        batch_size=args.batch_size,
    )
    rows: list[int] = []

    def copy() -> int:
        rows.append(anyio.run(run))
        return EXIT_OK

    code = exit_code_of(
        copy, interrupted="interrupted; rows copied so far are kept, rerun to finish"
    )
    if code != EXIT_OK:
        return code
    summary: dict[str, object] = {"command": "cache copy", "src": _show(args.src)}
    if is_postgres_url(args.src):
        summary["src_table"] = args.src_table
    summary["dst"] = _show(args.dst)
    if is_postgres_url(args.dst):
        summary["dst_table"] = args.dst_table
    summary.update(rows=rows[0], seconds=round(time.perf_counter() - started, 3))
    sys.stdout.write(json.dumps(summary) + "\n")
    return EXIT_OK


def _show(location: str) -> str:
    return display_url(location) if is_postgres_url(location) else location
