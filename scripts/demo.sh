#!/usr/bin/env bash
# The main job: install into .venv and run the bundled demo optimization
# (scripted provider, SQLite cache; no key needed). Outputs land in out/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh plot
exec .venv/bin/python -m engine optimize examples/demo.toml "$@"
