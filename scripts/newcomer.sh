#!/usr/bin/env bash
# A new user's first hour (issue 19), replayed offline on a fresh temporary copy against
# the simulated provider (`python -m adapters.simulated_server`, real HTTP on loopback):
#   1. copy the examples/ folder elsewhere and run it (the README's demo, scripted provider)
#   2. point the copy at an endpoint with the README's own snippet; dry-run, then run:
#      the reported cost is within the printed bound and is what the server answered
#   3. Ctrl-C (SIGINT) a running evaluate, then rerun it: the rerun pays only what is missing
#   4. `bench --max-cost 1` on the README's run file; its recommendation pasted as told loads
#   5. the five mistakes: a run file copied without its folder, an [optimizer] without
#      base_url (on a wrong port), an unset api_key_env, a wrong adapter name, a missing
#      placeholder: each message names where (file:line [section] key) and the fix
#   6. a 4-worker local Ray cluster on this machine's CPUs
# One PASS/FAIL line per step; exits non-zero on the first failure (with that step's output).
# Usage: scripts/newcomer.sh    (PYTHON=/path/to/python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-.venv/bin/python}
case $PY in /*) ;; */*) PY=$REPO/$PY ;; esac # the steps run in another folder
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" # this checkout's engine and adapters
# a key of the shape a user has; the simulated provider checks none, the engine needs one
export OPENAI_API_KEY=sk-newcomer-0000000000000000
WORK=$(mktemp -d "${TMPDIR:-/tmp}/newcomer.XXXXXX")
SERVER_PID=
STEP=
cleanup() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

pass() { echo "PASS $STEP${1:+: $1}"; }
fail() {
  echo "FAIL $STEP: $1"
  for stream in out err; do
    if [ -s "$WORK/last.$stream" ]; then
      echo "  std$stream of the last command:"
      tail -n 30 "$WORK/last.$stream" | sed 's/^/  | /'
    fi
  done
  exit 1
}
# The CLI as a user types it, in the work folder: output in last.out/last.err, status in RC.
cli() {
  set +e
  (cd "$WORK" && "$PY" -m engine "$@") >"$WORK/last.out" 2>"$WORK/last.err"
  RC=$?
  set -e
}
expect_rc() { [ "$RC" -eq "$1" ] || fail "exit $RC, expected $1"; }
expect_err() { grep -qF -- "$1" "$WORK/last.err" || fail "stderr lacks: $1"; }
# Python asserting on files; a failed check exits with its message (printed by fail).
check() {
  local why
  why=$("$PY" - "$@" 2>&1) || fail "$why"
  CHECKED=$why
}
paid() {
  "$PY" -c 'import json, sys, urllib.request
print(json.load(urllib.request.urlopen(sys.argv[1], timeout=10))["paid"])' \
    "http://127.0.0.1:$PORT/_stats"
}
free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
line_of() { grep -n -m1 -F -- "$2" "$1" | cut -d: -f1; } # first line of $1 holding $2

STEP="simulated provider"
PORT=$(free_port)
"$PY" -m adapters.simulated_server --port "$PORT" --rpm 6000 --latency-median 0.02 \
  >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 200); do
  paid >/dev/null 2>&1 && break
  kill -0 "$SERVER_PID" 2>/dev/null || fail "the server exited: $(cat "$WORK/server.log")"
  sleep 0.1
done
paid >/dev/null 2>&1 || fail "nothing listens on port $PORT after 20 s"
pass "http://127.0.0.1:$PORT/v1"

STEP="1 copy the example folder and run it"
cp -r "$REPO/examples" "$WORK/my_run"
cli optimize my_run/demo.toml --quiet
expect_rc 0
check "$WORK/last.out" "$WORK/out/demo" <<'EOF'
import json, pathlib, sys
summary = json.loads(pathlib.Path(sys.argv[1]).read_text().splitlines()[-1])
out = pathlib.Path(sys.argv[2])
if pathlib.Path(summary["output"]) != out or not (out / "best_prompt.json").is_file():
    sys.exit(f"outputs went to {summary['output']}, not beside the copy ({out})")
if summary["score"] != 1.0:
    sys.exit(f"the demo scored {summary['score']}, not 1.0")
print(f"score {summary['initial_score']} -> {summary['score']}, outputs in {out.name}/")
EOF
pass "$CHECKED"

STEP="2 the README's endpoint snippet: dry run, then run within the bound"
# "change the model names and the endpoint sections; nothing else": the README's own
# TOML block replaces [prompt] model, [model] and [optimizer]; base_url -> this server
check "$REPO/README.md" "$WORK/my_run/demo.toml" "http://127.0.0.1:$PORT/v1" <<'EOF'
import pathlib, re, sys
readme, run_file, url = pathlib.Path(sys.argv[1]).read_text(), pathlib.Path(sys.argv[2]), sys.argv[3]
part = readme.split("### The same run against a real endpoint", 1)[1]
snippet = part.split("```toml\n", 1)[1].split("```", 1)[0].replace("https://api.openai.com/v1", url)
def sections(text):
    found, name = {}, ""
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\[([^\]]+)\]\s*$", line)
        name = header.group(1) if header else name
        found[name] = found.get(name, "") + line
    return found
mine, theirs = sections(run_file.read_text()), sections(snippet)
model = re.search(r'^model = ".*"$', theirs["prompt"], re.M).group(0)
mine["prompt"] = re.sub(r'^model = ".*"$', model, mine["prompt"], count=1, flags=re.M)
for name in ("model", "optimizer"):
    mine[name] = theirs[name].rstrip("\n") + "\n\n"
run_file.write_text("".join(mine.values()))
print("ok")
EOF
cli optimize my_run/demo.toml --dry-run
expect_rc 0
expect_err "[optimizer] calls http://127.0.0.1:$PORT/v1 (inherited from [model])"
grep -qF "$OPENAI_API_KEY" "$WORK/last.out" "$WORK/last.err" && fail "the dry run printed the key"
cp "$WORK/last.out" "$WORK/plan.json"
before=$(paid)
cli optimize my_run/demo.toml --quiet
expect_rc 0
check "$WORK/plan.json" "$WORK/last.out" "$before" "$(paid)" <<'EOF'
import json, pathlib, sys
plan = json.loads(pathlib.Path(sys.argv[1]).read_text())
summary = json.loads(pathlib.Path(sys.argv[2]).read_text().splitlines()[-1])
paid = int(sys.argv[4]) - int(sys.argv[3])
bound, cost = plan["max_cost_usd"], summary["cost_usd"]
if bound is None or cost is None or not 0 < cost <= bound:
    sys.exit(f"reported cost {cost} is not within the printed bound {bound}")
if sum(summary["calls"].values()) != paid:
    sys.exit(f"the run reports {summary['calls']} calls, the server answered {paid}")
print(f"${cost:.4f} for {paid} calls, bound ${bound:.4f} for {plan['max_calls']} calls")
EOF
pass "$CHECKED"

STEP="3 Ctrl-C a running evaluate, then resume"
ROWS=600
CONCURRENCY=$("$PY" -c 'import sys, tomllib
print(tomllib.load(open(sys.argv[1], "rb"))["model"]["limits"]["concurrency"])' "$WORK/my_run/demo.toml")
"$PY" -c 'import json, random, sys
rng = random.Random(7)
with open(sys.argv[1], "w") as out:
    for i in range(int(sys.argv[2])):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.write(json.dumps({"id": f"b{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n")
' "$WORK/my_run/big.jsonl" "$ROWS"
sed 's/^train = "arithmetic_train.jsonl"/train = "big.jsonl"/' "$WORK/my_run/demo.toml" >"$WORK/my_run/big.toml"
before=$(paid)
# a background job of a script ignores SIGINT; a user's Ctrl-C reaches a process that does not
(cd "$WORK" && exec "$PY" -c 'import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_DFL)
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])' -m engine evaluate my_run/big.toml --quiet) \
  >"$WORK/last.out" 2>"$WORK/last.err" &
EVAL_PID=$!
for _ in $(seq 600); do
  [ $(($(paid) - before)) -ge $((ROWS / 4)) ] && break
  kill -0 "$EVAL_PID" 2>/dev/null || break
  sleep 0.1
done
kill -INT "$EVAL_PID" 2>/dev/null || fail "evaluate ended before a quarter of its calls was paid"
set +e
wait "$EVAL_PID"
RC=$?
set -e
expect_rc 130
expect_err "interrupted; rerun the same command to resume"
first=$(($(paid) - before))
cli evaluate my_run/big.toml --quiet
expect_rc 0
check "$WORK/last.out" "$first" "$(($(paid) - before - first))" "$ROWS" "$CONCURRENCY" <<'EOF'
import json, pathlib, sys
summary = json.loads(pathlib.Path(sys.argv[1]).read_text().splitlines()[-1])
first, second, rows, concurrency = map(int, sys.argv[2:])
hits = summary["cache_hits"]
if summary["completed"] != rows or summary["errors"]:
    sys.exit(f"the rerun completed {summary['completed']} of {rows}, {summary['errors']} errors")
if second != rows - hits:
    sys.exit(f"the rerun paid {second} calls for {rows - hits} missing answers")
if first - hits > concurrency:
    sys.exit(f"{first - hits} answers paid before Ctrl-C were lost (> concurrency {concurrency})")
print(f"interrupted after {first} paid; the rerun took {hits} from the cache and paid {second}")
EOF
pass "$CHECKED"

STEP="4 bench --max-cost 1, its recommendation pasted as told"
cli bench my_run/demo.toml --max-cost 1 --json bench.json
expect_rc 0
check "$WORK/bench.json" "$WORK/last.out" "$WORK/my_run/demo.toml" <<'EOF'
import json, pathlib, re, sys
report = json.loads(pathlib.Path(sys.argv[1]).read_text())
stdout, run_file = pathlib.Path(sys.argv[2]).read_text(), pathlib.Path(sys.argv[3])
if report["cost_usd"] is None or report["cost_usd"] > 1.0:
    sys.exit(f"the sweep cost {report['cost_usd']}, over the --max-cost 1")
head, _, block = stdout[stdout.index("\nrecommendation") + 1 :].partition("\n")
where = re.search(r"replace \S+:(\d+)(?:-(\d+))? ", head)
if where is None:
    sys.exit(f"the recommendation does not say where it goes: {head}")
lines = run_file.read_text().splitlines()
first, last = int(where.group(1)), int(where.group(2) or where.group(1))
lines[first - 1 : last] = block.splitlines()
run_file.write_text("\n".join(lines) + "\n")
print(f"{report['attempts']} requests, ${report['cost_usd']:.4f}, best concurrency {report['best_concurrency']}")
EOF
summary=$CHECKED
cli optimize my_run/demo.toml --dry-run
expect_rc 0
pass "$summary; the pasted file loads"

# -- the five mistakes: each names where and how to fix it --------------------------------
STEP="5a mistake: a run file copied without its folder"
cp "$REPO/examples/demo.toml" "$WORK/alone.toml"
cli optimize alone.toml --dry-run
expect_rc 2
expect_err "alone.toml:$(line_of "$WORK/alone.toml" 'file = "prompt.json"'): [prompt] file"
expect_err "paths are relative to the run file's folder"
expect_err "copy the run file together with its folder"
pass "names alone.toml:$(line_of "$WORK/alone.toml" 'file = "prompt.json"') [prompt] file, the folder paths are relative to, the fix"

STEP="5b mistake: [optimizer] without base_url, on a wrong port"
closed=$(free_port) # nothing listens there
sed "s#127.0.0.1:$PORT/v1#127.0.0.1:$closed/v1#" "$WORK/my_run/demo.toml" >"$WORK/my_run/port.toml"
cli optimize my_run/port.toml --dry-run
expect_rc 0
expect_err "[optimizer] calls http://127.0.0.1:$closed/v1 (inherited from [model])"
cli optimize my_run/port.toml --quiet
expect_rc 1
at="port.toml:$(line_of "$WORK/my_run/port.toml" "base_url")"
expect_err "[optimizer] calls http://127.0.0.1:$closed/v1, set at my_run/$at [model] options.base_url"
expect_err "fix: start the server, or correct the host and port there"
[ "$(grep -c 'connection refused' "$WORK/last.err")" -eq 1 ] || fail "the error is not printed once"
pass "the dry run shows where [optimizer] calls; the refusal names $at and the fix"

STEP="5c mistake: api_key_env names an unset variable (dry run)"
OPENAI_API_KEY= cli optimize my_run/demo.toml --dry-run
expect_rc 2
at="demo.toml:$(line_of "$WORK/my_run/demo.toml" 'api_key_env')"
expect_err "$at: [model] api_key_env: environment variable OPENAI_API_KEY is not set"
expect_err "fix: export OPENAI_API_KEY="
pass "names $at and the fix"

STEP="5d mistake: a wrong adapter name"
sed '0,/adapters.openai_chat:OpenAIChat/s//adapters.openai:OpenAIChat/' \
  "$WORK/my_run/demo.toml" >"$WORK/my_run/adapter.toml"
cli optimize my_run/adapter.toml --dry-run
expect_rc 2
at="adapter.toml:$(line_of "$WORK/my_run/adapter.toml" 'adapters.openai:OpenAIChat')"
expect_err "$at: [model] adapter"
expect_err "did you mean 'adapters.openai_chat:OpenAIChat'"
pass "names $at and suggests adapters.openai_chat:OpenAIChat"

STEP="5e mistake: a placeholder the rows do not have"
sed 's/{question}/{query}/' "$WORK/my_run/prompt.json" >"$WORK/my_run/query_prompt.json"
sed 's/^file = "prompt.json"/file = "query_prompt.json"/' "$WORK/my_run/demo.toml" \
  >"$WORK/my_run/query.toml"
cli optimize my_run/query.toml --dry-run
expect_rc 2
expect_err "arithmetic_train.jsonl:1: [data] train"
expect_err "inputs lack placeholder(s) ['query']; the rows have: question"
expect_err "rename the column or the {placeholder}"
pass "names the row's file:line, the columns there are and the fix"

STEP="6 a 4-worker local cluster on this machine's CPUs"
# its own cache: every answer is the workers' to fetch, none the driver's from step 2
sed 's#^path = ".*cache.sqlite"#path = "cluster.sqlite"#' "$WORK/my_run/demo.toml" \
  >"$WORK/my_run/cluster.toml"
before=$(paid)
cli evaluate my_run/cluster.toml --cluster local --workers 4 --quiet
expect_rc 0
check "$WORK/last.out" "$(($(paid) - before))" <<'EOF'
import json, pathlib, sys
summary = json.loads(pathlib.Path(sys.argv[1]).read_text().splitlines()[-1])
if summary["completed"] != 40 or summary["errors"] or int(sys.argv[2]) != 40:
    sys.exit(f"{summary['completed']} of 40 completed, {summary['errors']} errors, {sys.argv[2]} paid")
print(f"40 examples on 4 workers, 40 paid")
EOF
pass "$CHECKED"

echo "PASS all steps"
