#!/usr/bin/env bash
# The main job: install into .venv and run the bundled demo optimization
# (scripted provider, SQLite cache; no key needed). Outputs land in out/demo/.
#   scripts/demo.sh [ARGS...]          the one-prompt arithmetic demo (examples/demo.toml)
#   scripts/demo.sh program [ARGS...]  the two-stage program demo (examples/program/run.toml)
# ARGS go to `python -m engine optimize` (e.g. --dry-run, --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh plot
run_file=examples/demo.toml
if [ "${1:-}" = "program" ]; then
  shift
  run_file=examples/program/run.toml
fi
exec .venv/bin/python -m engine optimize "$run_file" "$@"
