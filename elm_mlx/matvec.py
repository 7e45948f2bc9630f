"""One-row products through sgemv while decoding on the CPU.

On the CPU, MLX sends every matrix product to BLAS `sgemm`. With one row (single-token decoding)
OpenBLAS 0.3.21, the version Debian and Ubuntu LTS ship, packs the whole weight matrix first: an
OpenELM-270M FFN weight's product takes 1.25 ms against sgemv's 0.89 on one thread (2 cores,
idle), and with other processes on the CPU MLX's decode step takes 2x as long as with sgemv or more.
`matvec_on_cpu` routes one-row float32 products of the model's linear layers (and of the tied
output embedding) to NumPy's matrix-vector BLAS over the same memory, without copying the
weights. Prompt processing (many rows) stays on MLX. benchmarks/RESULTS.md records where it
pays (and where it does not).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten


def _matvec(x: mx.array, weight: np.ndarray) -> mx.array:
    """x[..., in] @ weight.T for a single row x, through NumPy's sgemv on the shared weight memory."""
    mx.eval(x)
    row = np.asarray(x, dtype=np.float32).reshape(-1)
    return mx.array(weight @ row).reshape(*x.shape[:-1], weight.shape[0])


# Below this size sgemm's packing costs less than handing the product to NumPy and back.
MATVEC_MIN_WEIGHT_BYTES = 4 * 2**20


def _host_view(weight: mx.array, min_bytes: int) -> np.ndarray | None:
    """A zero-copy NumPy view of a float32 row-major weight of at least MIN_BYTES, or None."""
    if weight.dtype != mx.float32 or weight.nbytes < min_bytes:
        return None
    mx.eval(weight)
    view = np.asarray(memoryview(weight))
    return view if view.flags.c_contiguous else None


class _MatvecLinear(nn.Module):
    """A bias-free `nn.Linear` whose one-row products use sgemv. `weight` stays readable for
    wrappers that use it directly (mlx-lm's DoRA layers)."""

    def __init__(self, linear: nn.Linear, host_weight: np.ndarray):
        super().__init__()
        self.linear = linear
        self.weight = linear.weight
        self._host_weight = host_weight

    def __call__(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:
            return _matvec(x, self._host_weight)
        return self.linear(x)


class _MatvecEmbedding(nn.Module):
    """An `nn.Embedding` whose `as_linear` (the tied output head) uses sgemv for one row."""

    def __init__(self, embedding: nn.Embedding, host_weight: np.ndarray):
        super().__init__()
        self.embedding = embedding
        self.weight = embedding.weight
        self._host_weight = host_weight

    def __call__(self, ids: mx.array) -> mx.array:
        return self.embedding(ids)

    def as_linear(self, x: mx.array) -> mx.array:
        if x.size == x.shape[-1]:
            return _matvec(x, self._host_weight)
        return self.embedding.as_linear(x)


def _matvec_replacements(model: nn.Module, min_bytes: int) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, original, replacement) for every layer whose one-row products can use sgemv."""
    replacements = []
    for name, module in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        # Exact types only: quantized and LoRA layers keep their own kernels.
        if type(module) is nn.Linear and "bias" not in module:
            wrapper: type[nn.Module] = _MatvecLinear
        elif type(module) is nn.Embedding:
            wrapper = _MatvecEmbedding
        else:
            continue
        host_weight = _host_view(module.weight, min_bytes)
        if host_weight is not None:
            replacements.append((name, module, wrapper(module, host_weight)))
    return replacements


def cpu_uses_sgemm_for_matvec() -> bool:
    """True where MLX computes on the CPU, whose one-row products go through BLAS sgemm."""
    return mx.default_device() == mx.cpu


@contextlib.contextmanager
def _single_threaded_numpy_blas() -> Iterator[None]:
    """One BLAS thread for NumPy's (not MLX's) library while decoding.

    A matrix-vector product is bound by memory bandwidth, which one core nearly saturates on a
    small machine. On an idle 2-core machine a second thread makes an OpenELM-270M decode step
    at most 1.1x faster (73-85 ms against 84-90, means of 200 steps) and single steps swing
    48-204 ms; with two other busy processes it makes the step 5x slower (412-436 ms against
    80-148), as each of the ~100 products per token waits for a thread that has no core. Choosing
    the count by timing steps as they run was tried and gained nothing measurable (80-89 ms).
    """
    from threadpoolctl import ThreadpoolController

    mlx_blas = {os.path.realpath(p) for p in os.environ.get("LD_PRELOAD", "").split(":") if p}
    controllers = [lib for lib in ThreadpoolController().lib_controllers
                   if lib.user_api == "blas" and os.path.realpath(lib.filepath) not in mlx_blas]
    threads = [lib.num_threads for lib in controllers]
    for lib in controllers:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, count in zip(controllers, threads, strict=True):
            lib.set_num_threads(count)


@contextlib.contextmanager
def matvec_on_cpu(model: nn.Module, enabled: bool | None = None,
                  min_weight_bytes: int | None = None) -> Iterator[nn.Module]:
    """Within the block, the model's one-row float32 products use sgemv (see the module doc).

    `enabled=None` turns it on where MLX runs on the CPU; only weights of at least
    `min_weight_bytes` (default `MATVEC_MIN_WEIGHT_BYTES`) are routed. The original layers are
    put back on exit, so training, adapters and saving see the model unchanged.
    """
    if enabled is None:
        enabled = cpu_uses_sgemm_for_matvec()
    if min_weight_bytes is None:
        min_weight_bytes = MATVEC_MIN_WEIGHT_BYTES
    replacements = _matvec_replacements(model, min_weight_bytes) if enabled else []
    if not replacements:
        yield model
        return
    model.update_modules(tree_unflatten([(name, new) for name, _, new in replacements]))
    try:
        with _single_threaded_numpy_blas():
            yield model
    finally:
        model.update_modules(tree_unflatten([(name, old) for name, old, _ in replacements]))
