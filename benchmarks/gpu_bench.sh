#!/usr/bin/env bash
# A single-GPU slice of the training-bottleneck study, sized for one H200 in under 8 minutes:
# the study's LLaMA-style 100M and 500M models, vanilla (eager) vs sdpa vs FlashAttention-2
# (flash only when the flash-attn package is installed), per-device batch 8, 16 and 32,
# sequence length 1024, bf16, DDP on one GPU; 3 warm-up steps, then 3 repeats of 10 steps.
# 18 cells (12 without flash-attn), each about 10-25 s including start-up.
#
#   benchmarks/gpu_bench.sh [OUT_DIR]       (default: benchmarks/bench_gpu)
#
# Writes OUT_DIR/results.jsonl, results.csv, report.md and the figures. A rerun into the same
# directory skips the cells already measured. Set PYTHON to choose the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${1:-benchmarks/bench_gpu}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: $0 needs PyTorch with a CUDA device" >&2
    exit 1
fi
attention="[eager, sdpa]"
if "$PYTHON" -c "import flash_attn" 2>/dev/null; then
    attention="[eager, sdpa, flash]"
else
    echo "flash-attn is not installed: measuring eager and sdpa only" >&2
fi

mkdir -p "$OUT"
grid="$OUT/gpu_grid.yaml"
cat > "$grid" <<GRID
models: [llama-100M, llama-500M]
batch_sizes: [8, 16, 32]
attention: $attention
strategies: ddp
gpus: 1
seq_len: 1024
dtype: bfloat16
warmup_steps: 3
repeats: 3
steps_per_repeat: 10
timeout_s: 150
GRID

"$PYTHON" -m apps bench run --grid "$grid" --out "$OUT" --no-report
"$PYTHON" -m apps bench report "$OUT"
