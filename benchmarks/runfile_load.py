"""Run-file loading: the msgspec schema against the hand-written loader it replaced.

Both versions run side by side in one invocation, each measurement in fresh
subprocesses: the baseline is the ``engine/`` package of a git revision (default: where
this branch left ``main``), extracted to a temporary folder and put first on
``PYTHONPATH``; the candidate is this checkout.  CPU time (user + sys of the process,
``time.process_time``) is reported, the median of the repetitions.

    python benchmarks/runfile_load.py [--baseline REV] [--rows 100000] [--repeat 5]

Measured per version: the CPU cost of ``import engine.cli`` (what every CLI command
pays), loading ``examples/demo.toml`` (a run file with 60 rows) first in a process (what
a CLI command pays) and again, and loading a run file whose training set has ``--rows``
rows (JSONL).  Also, for the choice of library: the import cost of ``msgspec`` and of
pydantic's ``BaseModel`` alone (before any model class is built).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
t0 = time.process_time()
import engine.cli
from engine.cli._runfile import load_run_file
t1 = time.process_time()
loads = []
for _ in range(int(sys.argv[2])):
    s = time.process_time()
    run = load_run_file(sys.argv[1])
    loads.append(time.process_time() - s)
print(json.dumps({"import": t1 - t0, "first": loads[0], "warm": min(loads[1:] or loads),
                  "rows": len(run.train), "where": engine.__file__}))
"""

_IMPORT_ONLY = r"""
import sys, time
t0 = time.process_time()
exec(sys.argv[1])
print(time.process_time() - t0)
"""


def _extract(revision: str, into: Path) -> None:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "engine"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def _big_run(folder: Path, rows: int) -> Path:
    with (folder / "big.jsonl").open("w") as handle:
        for i in range(rows):
            handle.write(json.dumps({"id": f"r{i}", "question": f"{i} + 1", "answer": str(i + 1)}))
            handle.write("\n")
    text = (ROOT / "examples" / "demo.toml").read_text()
    text = text.replace('"arithmetic_train.jsonl"', '"big.jsonl"').replace(
        'val = "arithmetic_val.jsonl"\n', ""
    )
    text = text.replace('file = "prompt.json"', f'file = "{ROOT / "examples" / "prompt.json"}"')
    path = folder / "big.toml"
    path.write_text(text)
    return path


def _child(pythonpath: str, run_file: Path, loads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(run_file), str(loads)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd="/",
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def _import_cost(statement: str, repeat: int) -> float:
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", _IMPORT_ONLY, statement],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        for _ in range(repeat)
    ]
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=None, help="git revision (default: merge-base)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    baseline = (
        args.baseline
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _extract(baseline, folder / "old")
        big = _big_run(folder, args.rows)
        versions = {"hand-written (baseline)": str(folder / "old"), "msgspec schema": str(ROOT)}
        table: dict[str, dict[str, float]] = {}
        for name, path in versions.items():
            demo = [_child(path, ROOT / "examples" / "demo.toml", 20) for _ in range(args.repeat)]
            large = [_child(path, big, 1) for _ in range(args.repeat)]
            assert all(r["where"].startswith(path) for r in demo), demo[0]["where"]
            assert all(r["rows"] == args.rows for r in large)
            table[name] = {
                "import engine.cli (ms)": 1000 * statistics.median(r["import"] for r in demo),
                "load demo.toml, first in the process (ms)": 1000
                * statistics.median(r["first"] for r in demo),
                "load demo.toml, again (ms)": 1000 * statistics.median(r["warm"] for r in demo),
                f"load {args.rows:,}-row run file (s)": statistics.median(
                    r["first"] for r in large
                ),
            }
    print(f"baseline {baseline[:10]}, median of {args.repeat} processes, CPU time")
    names = list(table)
    print("| measure | " + " | ".join(names) + " | ratio |")
    print("|---|" + "---:|" * (len(names) + 1))
    for measure in table[names[0]]:
        old, new = (table[n][measure] for n in names)
        print(f"| {measure} | {old:.3f} | {new:.3f} | {new / old:.2f} |")
    for statement in ("import msgspec", "from pydantic import BaseModel"):
        cost = 1000 * _import_cost(statement, args.repeat)
        print(f"`{statement}` alone: {cost:.1f} ms CPU")


if __name__ == "__main__":
    main()
