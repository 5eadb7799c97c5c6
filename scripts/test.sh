#!/usr/bin/env bash
# Install the project with its dev tools into .venv, then lint, type-check and test.
# Usage: scripts/test.sh [pytest args...]   (default: the whole suite, slow tests included)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh dev
.venv/bin/ruff check engine adapters tests benchmarks scripts
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  set -- -q
fi
exec .venv/bin/python -m pytest "$@"
