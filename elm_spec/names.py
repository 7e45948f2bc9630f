"""Names every part of elm agrees on: attention kernels, parallel strategies, dtypes,
activation checkpointing modes and the exit code of a run that ran out of memory. Each twin maps
the dtype names to its own types."""

from __future__ import annotations

ATTENTION_KINDS = ("sdpa", "eager", "flash")
STRATEGIES = ("none", "ddp", "fsdp", "fsdp-grad-op", "hsdp")
SHARDED_STRATEGIES = ("fsdp", "fsdp-grad-op", "hsdp")
# Weights on disk and in memory; training computes in the first two.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TRAIN_DTYPES = ("bfloat16", "float32")
# train.activation_checkpointing: recompute nothing, all but the matmul and attention outputs
# (torchtitan's per-op policy), or each whole block.
AC_MODES = ("none", "selective", "full")
# train.float8: off, or torchao's recipes (scales per tensor, or per row: more accurate, slower).
FLOAT8_RECIPES = ("none", "tensorwise", "rowwise")
# The aten ops whose outputs selective checkpointing keeps (the expensive ones to recompute);
# names missing from the running torch are skipped.
SELECTIVE_AC_SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                          "_scaled_dot_product_flash_attention_for_cpu",
                          "_scaled_dot_product_efficient_attention",
                          "_scaled_dot_product_cudnn_attention")
# Rows of prepared token data (elm_train/data/format.py): windows cut from one packed stream, or
# CoreNet's one document chunk per row, padded (docs/reference.md section 3).
DATA_LAYOUTS = ("packed", "corenet")
# `elm train` exits with this when a step runs out of memory; `elm bench` records the cell as OOM.
OOM_EXIT_CODE = 3
# What MLX's affine quantization accepts (weights in `elm convert -q`, the KV cache in --kv-bits).
MLX_GROUP_SIZES = (32, 64, 128)
MLX_BITS = (2, 3, 4, 5, 6, 8)
