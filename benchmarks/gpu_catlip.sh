#!/usr/bin/env bash
# CatLIP vs CLIP training throughput on one GPU: ViT-B/16 at 224 px in bf16 autocast, with
# CoreNet's CLIP text tower (49,408 tokens, context 77, width 512, 12 layers) and CatLIP's
# 24,320-synset head. Forward + backward + AdamW per step; the two models alternate after
# warm-up steps and the median step is reported. Run from the repository root:
#   bash benchmarks/gpu_catlip.sh [OUT_DIR]
# Writes OUT_DIR/catlip_gpu_b<batch>.json for each batch size and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/catlip-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for batch in 64 128 256; do
  "$PY" -m apps catlip bench --preset vit-base --image-size 224 --batch-size "$batch" \
    --steps 10 --warmup 3 --device cuda --dtype bfloat16 --json "$OUT/catlip_gpu_b$batch.json" \
    || echo "batch $batch failed (out of memory?)"
done
