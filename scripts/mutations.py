"""Apply single-line mutations to the core, one at a time, and check a test kills each.

The table holds the mutations of the audit in issue #15 (each once survived the suite)
and others of the same kind: every one changes a line a guarantee rests on.  A mutation
is *killed* when the tests it names fail with it applied; the file is restored after
each run whatever happens.  Not in CI (it runs the fast tests once per mutation):

    .venv/bin/python scripts/mutations.py            # all; writes the table to stdout
    .venv/bin/python scripts/mutations.py --only tally-denominator

Exit status 1 when any mutation survives.  See TESTING.md for the last run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = (
    Mutation(
        "tally-denominator",
        "engine/_tally.py",
        "if reachable > must_beat * total:",
        "if reachable > must_beat * (total - self.errors):",
        ("tests/test_trust.py", "tests/test_evaluate.py"),
        "racing's bound leaves errors out of the denominator (the old, optimistic rule)",
    ),
    Mutation(
        "metric-key-identity",
        "engine/cache/_cache.py",
        'return f"m:{metric_id}:{answer}"',
        'return f"m:{answer}"',
        ("tests/test_mutations.py", "tests/test_trust.py", "tests/test_cache.py"),
        "the metric-result key drops the metric's identity",
    ),
    Mutation(
        "pause-gate-recheck",
        "engine/endpoint/_limits.py",
        "            if self._paused_until != -math.inf:\n"
        "                await self.wait_until_open(admit)\n"
        "            if self._pacer",
        "            if self._pacer",
        ("tests/test_limits.py",),
        "the gate is not checked again after waiting for the buckets",
    ),
    Mutation(
        "burst-full-second",
        "engine/endpoint/_limits.py",
        "max(1.0, rpm / 600.0)",
        "max(1.0, rpm / 60.0)",
        ("tests/test_limits.py",),
        "the default burst widens from a tenth of a second to a full second of rate",
    ),
    Mutation(
        "full-set-tie-accepted",
        "engine/training/_proposals.py",
        "if wins(full.conservative_score, key, bar, trainer.best_key()):",
        "if full.conservative_score >= bar:",
        ("tests/test_mutations.py", "tests/test_trainer.py"),
        "a candidate that ties the best on the full set is accepted",
    ),
    Mutation(
        "batch-tie-accepted",
        "engine/training/_proposals.py",
        "if not wins(on_batch.conservative_score, key, self.batch_score, self.batch_key):",
        "if not on_batch.conservative_score >= self.batch_score:",
        ("tests/test_trust.py", "tests/test_trainer.py"),
        "a candidate that ties the best on the batch goes on to the full set",
    ),
    Mutation(
        "perfect-ignores-errors",
        "engine/training/_trainer.py",
        "record.perfect = current.errors == 0",
        "record.perfect = True",
        ("tests/test_mutations.py", "tests/test_trainer.py"),
        "a batch with an errored example counts as perfect",
    ),
    Mutation(
        "parallel-tie-break",
        "engine/training/_proposals.py",
        "key=lambda p: (-(p.full_score or 0.0), record_key(p, tie_break), p.variant),",
        "key=lambda p: (-(p.full_score or 0.0), record_key(p, tie_break), -p.variant),",
        ("tests/test_mutations.py",),
        "tied parallel winners go to the last variant",
    ),
    Mutation(
        "tpm-reconcile-not-awaited",
        "engine/endpoint/_endpoint.py",
        "await self.limiter.reconcile(estimated=call.estimate, actual=actual)",
        "self.limiter.reconcile(estimated=call.estimate, actual=actual)",
        ("tests/test_limits.py",),
        "tokens used beyond the estimate are never charged",
    ),
    Mutation(
        "on-outcome-not-awaited",
        "engine/_evaluate.py",
        "                await maybe\n",
        "                pass\n",
        ("tests/test_mutations.py",),
        "an async on_outcome callback is never run",
    ),
    Mutation(
        "coalesced-counted-as-paid",
        "engine/cache/_cache.py",
        "                return flight.value, True",
        "                return flight.value, False",
        ("tests/test_cache.py",),
        "a value another caller paid for counts as paid here",
    ),
    Mutation(
        "backoff-zero",
        "engine/endpoint/_retry.py",
        "return rng.uniform(0.0, ceiling)",
        "return 0.0",
        ("tests/test_limits.py",),
        "retries do not back off",
    ),
    Mutation(
        "decisions-on-mean",
        "engine/training/_proposals.py",
        "if wins(full.conservative_score, key, bar, trainer.best_key()):",
        "if wins(full.score, key, bar, trainer.best_key()):",
        ("tests/test_mutations.py", "tests/test_trust.py"),
        "acceptance uses the mean over scored examples (errors left out)",
    ),
    Mutation(
        "error-rate-never-checked",
        "engine/training/_trainer.py",
        "        if evaluation.error_rate <= limit:\n            return",
        "        if True:\n            return",
        ("tests/test_trust.py",),
        "max_error_rate is never enforced",
    ),
    Mutation(
        "history-exact-full-score",
        "engine/training/_proposals.py",
        "                entry = HistoryEntry("
        'prompt, bar, f"below the best ({bar:.3f}) on {where}")',
        '                entry = HistoryEntry(prompt, record.full_score or bar, "")',
        ("tests/test_trainer.py",),
        "the apply history shows a full-set loser's exact score (racing changes the text)",
    ),
    Mutation(
        "retry-after-cap-ignored",
        "engine/endpoint/_endpoint.py",
        "        if wait > cap:",
        "        if False:",
        ("tests/test_bounded.py",),
        "the pause gate waits out any Retry-After, however long",
    ),
    Mutation(
        "breaker-never-opens",
        "engine/endpoint/_breaker.py",
        "        if limit is None or self._failures < limit:",
        "        if True:",
        ("tests/test_bounded.py",),
        "a dead endpoint is retried forever",
    ),
    Mutation(
        "endpoint-not-shared",
        "engine/endpoint/_endpoint.py",
        "        shared = _shared_endpoint(model)\n",
        "        shared = None\n",
        ("tests/test_bounded.py",),
        "every evaluation of one adapter builds its own limiter",
    ),
    Mutation(
        "prediction-key-ignores-endpoint",
        "engine/cache/_cache.py",
        "text = canonical_json([prompt_hash, endpoint_identity, sent])",
        "text = canonical_json([prompt_hash, sent])",
        ("tests/test_trust.py",),
        "two servers serving the same model name share answers",
    ),
    Mutation(
        "metric-key-ignores-content",
        "engine/cache/_cache.py",
        'answer = hashlib.sha256(f"{content}:{prediction}".encode()).hexdigest()',
        'answer = hashlib.sha256(f"{example.id}:{prediction}".encode()).hexdigest()',
        ("tests/test_trust.py",),
        "a fixed label returns the old score",
    ),
    Mutation(
        "errors-scored-zero",
        "engine/_tally.py",
        "        if outcome.result is None:\n            self.errors += 1",
        "        if outcome.result is None:\n"
        "            self.errors += 1\n"
        "            self.scored += 1",
        ("tests/test_evaluate.py",),
        "an errored example counts in the mean as a 0",
    ),
    Mutation(
        "metric-timeout-ignored",
        "engine/_scoring.py",
        "        pending = self.watcher.watch(loop, started + timeout)",
        "        pending = self.watcher.watch(loop, math.inf)",
        ("tests/test_bounded.py",),
        "a metric that never returns hangs the run",
    ),
    Mutation(
        "sync-metric-on-the-loop",
        "engine/_scoring.py",
        "        if took > SLOW_CALL:",
        "        if took > 3600:",
        ("tests/test_bounded.py",),
        "a slow synchronous metric blocks the event loop",
    ),
    Mutation(
        "unsaved-slot-released-before-put",
        "engine/cache/_cache.py",
        "                value, raw, store_key = await compute()\n"
        "                await self.store.put(store_key, raw)\n",
        "                value, raw, store_key = await compute()\n"
        "            await self.store.put(store_key, raw)\n",
        ("tests/test_cache.py",),
        "a paid call frees its max_unsaved slot before its answer is stored",
    ),
    Mutation(
        "cpu-bound-metric-keeps-every-thread",
        "engine/_scoring.py",
        "                    self._cap_threads()\n",
        "                    pass\n",
        ("tests/test_bounded.py",),
        "a CPU-bound metric's threads take turns at the GIL and starve the loop",
    ),
    Mutation(
        "sqlite-key-set-ignores-other-writers",
        "engine/cache/_stores.py",
        "            if self._foreign:\n",
        "            if False:\n",
        ("tests/test_cache.py",),
        "a row another process committed is never a hit for a store already open",
    ),
    Mutation(
        "put-returns-before-commit",
        "engine/cache/_postgres.py",
        "        if self.wait_for_commit:\n",
        "        if False:\n",
        ("tests/test_postgres.py",),
        "wait_for_commit is ignored: a killed worker loses the answers in its queue",
    ),
)


def run(mutation: Mutation, python: str) -> tuple[bool, float, str]:
    """Apply, test, restore: (killed, seconds, the first failing test or the reason)."""
    path = ROOT / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return False, 0.0, f"the line to mutate is not found exactly once in {mutation.path}"
    path.write_text(original.replace(mutation.old, mutation.new))
    started = time.monotonic()
    try:
        done = subprocess.run(
            [
                python,
                "-m",
                "pytest",
                "-x",
                "-q",
                "-p",
                "no:cacheprovider",
                "--timeout",
                "120",
                "-m",
                "not slow",
                *mutation.tests,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
    finally:
        path.write_text(original)
    failed = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
    return done.returncode != 0, time.monotonic() - started, (failed[0] if failed else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only these mutations (by name)")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    survivors = 0
    print("| mutation | file | what it breaks | result | killed by |")
    print("|---|---|---|---|---|")
    for mutation in chosen:
        killed, seconds, detail = run(mutation, sys.executable)
        survivors += not killed
        verdict = f"killed ({seconds:.0f} s)" if killed else "**SURVIVED**"
        test = detail.removeprefix("FAILED ").split(" - ")[0] if killed else detail
        print(
            f"| `{mutation.name}` | `{mutation.path}` | {mutation.why} | {verdict} | {test} |",
            flush=True,
        )
    print(f"\n{len(chosen) - survivors} of {len(chosen)} mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
