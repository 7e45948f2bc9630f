"""`elm doctor`: versions, devices, and whether MLX on Linux runs on a fast BLAS."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import typer

# Below this fp32 GEMM rate MLX is on the reference BLAS its Linux wheel bundles (about
# 4 GFLOP/s on a 2-core machine, against 150 or more with OpenBLAS).
SLOW_GEMM_GFLOPS = 20.0
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")


def package_version(distribution: str, module: str | None = None) -> str | None:
    """The installed version of DISTRIBUTION, or of MODULE's `__version__`; None if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(getattr(importlib.import_module(module or distribution), "__version__", "unknown"))
    except ImportError:
        return None


def elm_version() -> str:
    version = package_version("elm")
    if version is not None and version != "unknown":
        return version
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE)
    except OSError:
        found = None
    return f"{found.group(1)} (source checkout)" if found else "source checkout"


def torch_lines() -> Iterator[str]:
    version = package_version("torch")
    if version is None:
        yield "torch: not installed (training needs `pip install elm[train]`)"
        return
    import torch

    yield f"torch: {version}"
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        yield f"  CUDA {torch.version.cuda}: {torch.cuda.device_count()} device(s): {names}"
    else:
        yield "  CUDA: no device"
    mps = getattr(torch.backends, "mps", None)
    yield f"  MPS: {'available' if mps is not None and mps.is_available() else 'no'}"
    flash = package_version("flash-attn", "flash_attn")
    yield f"  flash-attn: {flash or 'not installed'}"


def mlx_gemm_gflops(size: int = 1024, budget_s: float = 0.5) -> float:
    """Best fp32 GEMM rate of MLX's default device on SIZE^3, in GFLOP/s, over about BUDGET_S
    seconds (one product at least: a slow BLAS takes most of a second for one)."""
    import mlx.core as mx

    warm_up = mx.random.normal((64, 64))
    mx.eval(warm_up @ warm_up)
    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b)
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    while best == float("inf") or time.perf_counter() < deadline:
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def preloaded_openblas() -> str | None:
    for library in os.environ.get("LD_PRELOAD", "").split(":"):
        if "openblas" in Path(library).name.lower():
            return library
    return None


def mlx_lines() -> Iterator[str]:
    version = package_version("mlx")
    if version is None:
        yield "mlx: not installed (generation and LoRA need `pip install elm[mlx]`)"
        return
    import mlx.core as mx

    yield f"mlx: {version} (default device: {mx.default_device()})"
    yield f"mlx-lm: {package_version('mlx-lm', 'mlx_lm') or 'not installed'}"
    if platform.system() != "Linux":
        return
    from elm_spec.platform import OPENBLAS_INSTALL_HINT, OPENBLAS_PRELOAD_ENV, openblas_preload_path

    rate = mlx_gemm_gflops()
    preloaded = preloaded_openblas()
    yield f"  MLX fp32 GEMM 1024^3: {rate:.1f} GFLOP/s"
    yield f"  OpenBLAS preloaded: {'yes (' + preloaded + ')' if preloaded else 'no'}"
    if preloaded is None:
        installed = openblas_preload_path()
        if installed is None:
            yield (f"  fix: `{OPENBLAS_INSTALL_HINT}`; `elm` then preloads it for MLX "
                   "automatically (MLX's bundled reference BLAS is ~40x slower)")
        elif os.environ.get(OPENBLAS_PRELOAD_ENV) == "0":
            yield (f"  fix: unset {OPENBLAS_PRELOAD_ENV}=0 and `elm` preloads {installed} for MLX, "
                   f"or run Python with LD_PRELOAD={installed}")
        else:
            yield f"  fix: run Python with LD_PRELOAD={installed} (the `elm` command does this itself)"
    if rate < SLOW_GEMM_GFLOPS:
        yield "  MLX is on the slow reference BLAS"
    if mx.default_device() == mx.cpu:
        yield ("  quantized models decode 3-5x and read prompts 10-16x slower than fp32 on a CPU "
               "(MLX has no fast CPU kernels for them; on a Mac's GPU they are faster): convert "
               "without -q to run here (docs/generate.md)")


def library_lines() -> Iterator[str]:
    for distribution, module in (("transformers", None), ("sentencepiece", None),
                                 ("safetensors", None), ("numpy", None),
                                 ("threadpoolctl", None), ("nltk", None)):
        yield f"{distribution}: {package_version(distribution, module) or 'not installed'}"


def lm_eval_line() -> str:
    version = package_version("lm_eval")
    if version is None:
        return "lm-eval: not installed (`pip install elm[eval]`)"
    return f"lm-eval: {version}; run it with `elm eval harness --model elm ...`"


def wordnet_line() -> str:
    try:
        import nltk

        return f"WordNet (CatLIP): NLTK data at {nltk.data.find('corpora/wordnet')}"
    except (ImportError, LookupError):
        pass
    if (DEBIAN_WORDNET_DIR / "data.noun").is_file():
        return f"WordNet (CatLIP): Debian database at {DEBIAN_WORDNET_DIR}"
    return ("WordNet (CatLIP): missing; `sudo apt-get install wordnet-base wordnet-sense-index` "
            "or `python -m nltk.downloader wordnet`")


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor() -> None:
        """Report versions, devices and whether MLX runs on a fast BLAS, with the fix if not."""
        typer.echo(f"python: {platform.python_version()} ({sys.executable})")
        typer.echo(f"platform: {platform.platform()}, {os.cpu_count()} CPU cores")
        typer.echo(f"elm: {elm_version()}")
        for line in (*torch_lines(), *mlx_lines(), *library_lines(), lm_eval_line(),
                     wordnet_line()):
            typer.echo(line)
