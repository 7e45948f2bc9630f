#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with elm and everything its tests need.
# Linux: the CPU build of PyTorch, MLX's CPU wheel, and (as root) Debian's OpenBLAS, WordNet, and
# chromium with chromium-driver (the chat page's browser test).
# macOS: MLX with Metal; add PyTorch yourself if you also train on the Mac.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
step() { echo "[$(date +%H:%M:%S)] $*"; }

if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  PACKAGES=(libopenblas0-pthread wordnet-base wordnet-sense-index chromium chromium-driver)
  if ! dpkg -s "${PACKAGES[@]}" >/dev/null 2>&1; then
    step "Debian packages: ${PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
  fi
fi

step "virtual environment in .venv"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$(uname -s)" = "Linux" ]; then
  step "PyTorch (the CPU wheel)"
  # The CPU wheel; a bare `torch` requirement would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
step "elm and its extras (MLX, mlx-lm, transformers, lm-eval, datatrove, the server; a few minutes)"
.venv/bin/python -m pip install -q -e ".[all]"
step "done"
echo "elm is installed in .venv: run 'source .venv/bin/activate', then 'elm doctor'."
