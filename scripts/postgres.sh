#!/usr/bin/env bash
# A real PostgreSQL server for the shared cache (engine.PostgresStore) and its tests:
# Debian's PostgreSQL 15, one throw-away cluster per port, trust auth on loopback only.
#
#   scripts/postgres.sh start [PORT]   install if needed, initdb, start, wait until ready
#   scripts/postgres.sh stop [PORT]    stop it cleanly (fast shutdown: commits are kept)
#   scripts/postgres.sh url [PORT]     print the connection URL
#
# The last line `start` prints is the URL: postgresql://engine@127.0.0.1:PORT/postgres
# Environment: PG_PORT (default 55432), PG_DIR (the cluster's directory; default
# .pg/PORT in the repository), PG_BIN (the server's bin directory).
# PostgreSQL refuses to run as root, so as root the server runs as `nobody` and owns
# PG_DIR; every parent of PG_DIR must then be searchable by `nobody` (a mktemp -d
# directory under /tmp is fine: it is chowned to `nobody`).
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${2:-${PG_PORT:-55432}}
DIR=${PG_DIR:-$PWD/.pg/$PORT}
RUN_AS=nobody

find_bin() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then echo "$PG_BIN"; return 0; fi
  if [ -x /usr/lib/postgresql/15/bin/initdb ]; then echo /usr/lib/postgresql/15/bin; return 0; fi
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$found" ] && [ -x "$found/initdb" ]; then echo "$found"; return 0; fi
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  return 1
}

install() {
  if BIN=$(find_bin); then return 0; fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing Debian's postgresql with apt-get..." >&2
    # initdb/pg_ctl are wanted, not the distribution's own cluster service
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2
    if BIN=$(find_bin); then return 0; fi
  fi
  echo "PostgreSQL's initdb was not found (install Debian's 'postgresql' or set PG_BIN)" >&2
  return 1
}

# Run a server binary as the unprivileged user when we are root.
as_server() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u "$RUN_AS" -- "$@"
  else
    "$@"
  fi
}

running() {
  [ -f "$DIR/data/postmaster.pid" ] && as_server "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1
}

init_cluster() {
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  if [ "$(id -u)" = 0 ]; then
    chown "$RUN_AS" "$DIR"
    if ! runuser -u "$RUN_AS" -- test -w "$DIR"; then
      echo "$DIR is not reachable by '$RUN_AS' (a parent directory is private); set PG_DIR" \
        "to a directory under /tmp" >&2
      return 1
    fi
  fi
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    as_server "$BIN/initdb" -D "$DIR/data" -A trust -U engine -E UTF8 --locale=C \
      >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; return 1; }
  fi
}

wait_ready() {
  for _ in $(seq 1 120); do
    if "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT" -U engine -d postgres; then return 0; fi
    if ! running; then
      echo "PostgreSQL is not running; see $DIR/log" >&2
      tail -n 20 "$DIR/log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.25
  done
  echo "PostgreSQL did not accept connections within 30 s; see $DIR/log" >&2
  return 1
}

url() {
  echo "postgresql://engine@127.0.0.1:$PORT/postgres"
}

case "${1:-}" in
  start)
    install
    init_cluster
    if running; then
      echo "already running in $DIR" >&2
    else
      # -k: the Unix socket lives in DIR, not in /var/run/postgresql (absent or root's)
      if ! as_server "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -t 60 \
          -o "-k $DIR -h 127.0.0.1 -p $PORT" start >&2; then
        echo "PostgreSQL failed to start on port $PORT; see $DIR/log" >&2
        tail -n 20 "$DIR/log" >&2 2>/dev/null || true
        exit 1
      fi
    fi
    wait_ready
    url
    ;;
  stop)
    BIN=$(find_bin) || exit 0
    if running; then
      # fast: roll back open transactions, checkpoint, exit; immediate only if that hangs
      as_server "$BIN/pg_ctl" -D "$DIR/data" -m fast -w -t 30 stop >&2 \
        || as_server "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >&2 || true
    fi
    ;;
  url)
    url
    ;;
  *)
    echo "usage: $0 start|stop|url [PORT]" >&2
    exit 2
    ;;
esac
