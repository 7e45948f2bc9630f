"""Facts about the machine that both twins and the command line need."""

from __future__ import annotations

import os
import platform
from pathlib import Path

OPENBLAS_PRELOAD_ENV = "ELM_OPENBLAS"
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
)
OPENBLAS_INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"


def openblas_preload_path() -> str | None:
    """The OpenBLAS library to preload for MLX on Linux, if one is installed."""
    if platform.system() != "Linux":
        return None
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def idle_cores(processes: int = 1) -> int:
    """Cores each of PROCESSES can have now: those the 1-minute load average leaves idle, at
    least 1. OpenMP threads wait for each other at every operation, so a thread on a core that
    another job holds stalls the whole step (on 2 busy cores the demo trained 10-30x slower with
    2 threads than with 1)."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average (Windows): assume an idle machine
        load = 0.0
    return max(1, int(cores - load + 0.5) // max(1, processes))


def load_summary() -> str:
    """`load average 3.1 on 2 cores` (empty where the OS keeps no load average)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return ""
    return f"load average {load:.1f} on {usable_cores()} cores"
