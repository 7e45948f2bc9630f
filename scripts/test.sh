#!/usr/bin/env bash
# Runs the test suite. On Linux, MLX's CPU wheel is preloaded with OpenBLAS (about 40x faster GEMMs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0
if [ "$(uname -s)" = "Linux" ] && [ -f "$OPENBLAS" ]; then
  export LD_PRELOAD="$OPENBLAS${LD_PRELOAD:+:$LD_PRELOAD}"
fi
exec "$PY" -m pytest "$@"
