# Sourced by the set-up scripts: make .venv if missing and install the project into it,
# only when pyproject.toml or the extras changed since the last install (a stamp file
# holds their hash), and quietly: pip's and setuptools' output (the 10-line "Editable
# installation" notice) is kept in .venv/install.log and shown only if the install fails.
# Usage: . scripts/venv.sh EXTRAS   (e.g. "dev" or "plot"); needs only Python 3.11 + pip.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
_stamp=$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read() + sys.argv[1].encode()).hexdigest())' "$1")
if [ "$(cat .venv/.installed-"$1" 2>/dev/null)" != "$_stamp" ]; then
  if ! { .venv/bin/python -m pip install --quiet --upgrade pip \
      && .venv/bin/python -m pip install --quiet -e ".[$1]"; } >.venv/install.log 2>&1; then
    cat .venv/install.log >&2
    return 1 2>/dev/null || exit 1
  fi
  echo "$_stamp" >".venv/.installed-$1"
fi
unset _stamp
