#!/usr/bin/env bash
# Install the project with its dev tools into .venv, then lint, type-check and test.
# Usage: scripts/test.sh [pytest args...]   (default: the whole suite, slow tests included)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/ruff check engine adapters tests benchmarks scripts
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  set -- -q
fi
exec .venv/bin/python -m pytest "$@"
