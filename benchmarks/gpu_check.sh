#!/usr/bin/env bash
# Training throughput check on one GPU (under 8 minutes on an H100/H200):
# OpenELM-270M and 1.1B, sdpa vs flash attention, torch.compile off and on, bf16.
#   benchmarks/gpu_check.sh [OUT.md]           on a GPU machine
#   benchmarks/gpu_check.sh --dry-run [OUT.md] on a CPU, to check the script itself
# Installs nothing except one attempt at `pip install flash-attn` (time-limited); without it
# the flash rows say "not installed".
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DRY=""
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; shift; fi
OUT=${1:-benchmarks/results/gpu_check.md}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ -z "$DRY" ] && ! "$PY" -c "import flash_attn" >/dev/null 2>&1; then
  echo "flash-attn missing; trying pip (at most 90 s)"
  timeout 90 "$PY" -m pip install --quiet --no-build-isolation flash-attn >/dev/null 2>&1 \
    || echo "flash-attn: not installed"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
exec timeout 460 "$PY" benchmarks/gpu_check.py $DRY --out "$OUT"
