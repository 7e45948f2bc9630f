"""Throughput accounting (docs/reference.md section 6), peak memory, and the run's metrics log.

RUN_DIR/metrics.jsonl gets one JSON object per logged step and a last `{"event": "end"}`
line; rank 0 writes it. TensorBoard scalars are optional.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from elm_spec.jsonl import read_jsonl_objects, read_jsonl_records
from elm_spec.writes import write_text_atomic


# Dense (no sparsity) tensor-core peaks per GPU in FLOP/s: bf16 and fp8 (docs/reference.md
# section 6). The first pattern that matches torch.cuda.get_device_name(), upper-cased, wins, so
# a PCIe or NVL card is told from the SXM part before the plain name matches; GH200, GB200, H800
# and L40 match none (a GPU not listed gets no peak, never another GPU's).
@dataclass(frozen=True)
class GpuPeak:
    gpu: str
    pattern: str
    bf16: float
    fp8: float | None


GPU_PEAKS = (
    GpuPeak("A100", r"\bA100\b", 312e12, None),
    GpuPeak("H100 NVL", r"\bH100\b.*\bNVL\b", 835e12, 1671e12),
    GpuPeak("H100 PCIe", r"\bH100\b.*\bPCIE\b", 756e12, 1513e12),
    GpuPeak("H100 SXM", r"\bH100\b", 989e12, 1979e12),
    GpuPeak("H200 NVL", r"\bH200\b.*\bNVL\b", 835e12, 1671e12),
    GpuPeak("H200", r"\bH200\b", 989e12, 1979e12),
    GpuPeak("L40S", r"\bL40S\b", 362e12, 733e12),
    GpuPeak("B200", r"\bB200\b", 2.25e15, 4.5e15),
)

METRICS_FILE = "metrics.jsonl"


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The table row of a CUDA device name, or None for a GPU the table does not list."""
    name = device_name.upper()
    return next((row for row in GPU_PEAKS if re.search(row.pattern, name)), None)


def gpu_peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    row = gpu_peak(device_name)
    return getattr(row, precision) if row is not None else None


def measure_gemm_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                       repeats: int = 5) -> float:
    """The best FLOP/s of a square torch matmul on DEVICE: the ceiling a training step can reach."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, configured: float = 0.0,
               precision: str = "bf16", warn: bool = False) -> float | None:
    """Per-device peak for MFU: CONFIGURED (log.peak_flops, --peak-flops), else the GPU table's
    PRECISION column, else measured on a CPU. None (MFU unknown) for a GPU the table lacks; WARN
    then says so in one line."""
    if configured:
        return configured
    if device.type != "cuda":
        return measure_gemm_flops(device, dtype)
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name, precision)
    if peak is None and warn:
        print(f"warning: MFU unknown: no {precision} peak for {name!r} in elm's table "
              "(docs/reference.md section 6); pass --peak-flops (log.peak_flops) with its dense "
              "peak FLOP/s", file=sys.stderr, flush=True)
    return peak


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def mfu(flops_per_item: float, items_per_s_per_device: float, peak: float | None) -> float | None:
    if not peak:
        return None
    return flops_per_item * items_per_s_per_device / peak


class MetricsLog:
    """JSONL (and optional TensorBoard) writer; a no-op on every rank but 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = False,
                 resume_step: int | None = None):
        """RESUME_STEP: the step training restarts from; records of later steps (logged by a
        run that was stopped before its next checkpoint) are dropped, so no step appears twice."""
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            self._drop_records_after(resume_step)
        self.file = self.path.open("a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def _drop_records_after(self, step: int) -> None:
        kept = [record for record in read_jsonl_records(self.path) if record.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    from elm_spec import ElmError

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ElmError(f"{path}: not found (is {run_dir} a training run directory?)")
    return [record for _, record in read_jsonl_objects(path, allow_empty=True)]
