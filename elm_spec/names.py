"""Names every part of elm agrees on: attention kernels, parallel strategies, dtypes and the
exit code of a run that ran out of memory. Each twin maps the dtype names to its own types."""

from __future__ import annotations

ATTENTION_KINDS = ("sdpa", "eager", "flash")
STRATEGIES = ("none", "ddp", "fsdp", "fsdp-grad-op", "hsdp")
SHARDED_STRATEGIES = ("fsdp", "fsdp-grad-op", "hsdp")
# Weights on disk and in memory; training computes in the first two.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
TRAIN_DTYPES = ("bfloat16", "float32")
# `elm train` exits with this when a step runs out of memory; `elm bench` records the cell as OOM.
OOM_EXIT_CODE = 3
