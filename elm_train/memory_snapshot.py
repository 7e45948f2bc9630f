"""A CUDA memory snapshot when a run runs out of memory (`log.oom_snapshot`).

While training on a GPU, torch's caching allocator records its last allocations and frees
with their Python stacks; on an out-of-memory error each rank dumps that history into the run
directory, where https://pytorch.org/memory_viz shows what held the memory. Nothing is recorded
on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Allocator events kept (a ring buffer: enough for several steps of a billion-parameter model)
# and the stacks they carry (Python only: C++ unwinding on every allocation slows the step).
RECORD_OPTIONS = {"max_entries": 100_000, "stacks": "python"}


def snapshot_file(rank: int) -> str:
    return f"memory-snapshot-rank-{rank:05d}.pickle"


def start_recording(device: torch.device) -> bool:
    """Record allocator history on a CUDA DEVICE; whether it records."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history(**RECORD_OPTIONS)
    return True


def stop_recording() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def dump(run_dir: str | os.PathLike[str], rank: int) -> Path:
    """Write the recorded history to RUN_DIR/memory-snapshot-rank-N.pickle (whole or not at all)
    and stop recording."""
    final = Path(run_dir) / snapshot_file(rank)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".tmp")
    try:
        torch.cuda.memory._dump_snapshot(str(partial))
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
        stop_recording()
    return final
