#!/usr/bin/env bash
# The main job: install into .venv and run the bundled demo optimization
# (scripted provider, SQLite cache; no key needed). Outputs land in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[plot]'
exec .venv/bin/python -m engine optimize examples/demo.toml "$@"
