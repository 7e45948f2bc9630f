"""Facts about the machine that both twins and the command line need."""

from __future__ import annotations

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
