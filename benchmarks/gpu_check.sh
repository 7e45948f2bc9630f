#!/usr/bin/env bash
# The first GPU run, in one script (under 8 minutes on one H200): MFU and tokens/s of
# OpenELM-270M, 450M and 1.1B at sequence 2048 in bf16 (sdpa / flash / eager attention,
# compile on and off, activation checkpointing none / selective / full, float8 on and off),
# the largest micro-batch that fits, a 50-step loss-parity run and `elm bench` on 4 cells.
#   OUT=DIR benchmarks/gpu_check.sh             on a GPU machine (default OUT: runs/gpu_check)
#   OUT=DIR benchmarks/gpu_check.sh --dry-run   on a CPU: every cell's code path, tiny model
# Everything is written under $OUT. Installs nothing: without flash_attn the flash rows say
# "not installed", without torchao the float8 rows carry elm's refusal.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u
  git rev-parse HEAD 2>/dev/null
  nvidia-smi 2>/dev/null || echo "nvidia-smi: not found"
  # Versions from the package metadata: importing torchao or flash_attn here would cost time.
  "$PY" - <<'PYTHON'
import importlib.metadata as metadata

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for package in ("flash-attn", "torchao", "triton", "transformers"):
    try:
        print(package, metadata.version(package))
    except metadata.PackageNotFoundError:
        print(package, "not installed")
PYTHON
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# The cells stop starting when --budget is spent (440 s); on a GPU the timeout only guards
# against a hang. The dry run has no such limit (a shared CPU is slow).
LIMIT=(timeout 470)
for arg in "$@"; do [ "$arg" = "--dry-run" ] && LIMIT=(); done
"${LIMIT[@]}" "$PY" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
