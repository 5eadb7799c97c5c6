# Sourced by the set-up scripts: make .venv if missing and install the project into it.
# Usage: . scripts/venv.sh EXTRAS   (e.g. "dev" or "plot")
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[$1]"
