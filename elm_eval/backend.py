"""Choosing and loading an evaluation backend: torch (elm_eval.torch_model) or MLX
(elm_eval.mlx_model), each imported only when chosen."""

from __future__ import annotations

import importlib.util
import os
import platform

from elm_eval.model import EvalModel
from elm_spec import ElmError
from elm_spec.hub import resolve
from elm_spec.modeldir import CONFIG_FILE, read_config, read_spec, require_model_dir
from elm_spec.tokenizer import Tokenizer, require_tokenizer

BACKENDS = ("torch", "mlx")
DEFAULT_BATCH_SIZE = 8


def installed_backends() -> list[str]:
    return [name for name in BACKENDS if importlib.util.find_spec(name) is not None]


def default_backend() -> str:
    """MLX on macOS when installed, otherwise torch; whichever is installed if only one is."""
    installed = installed_backends()
    if not installed:
        raise ElmError("neither torch nor mlx is installed: pip install 'elm[train]' or 'elm[mlx]'")
    preferred = ("mlx", "torch") if platform.system() == "Darwin" else ("torch", "mlx")
    return next(name for name in preferred if name in installed)


def is_quantized(directory: os.PathLike[str]) -> bool:
    return bool(read_config(directory).get("quantization"))


def chosen_backend(model_dir: str | os.PathLike[str]) -> str:
    """The default backend, except that a quantized directory goes to MLX, which runs it as
    it is."""
    directory = require_model_dir(resolve(model_dir))
    if is_quantized(directory) and "mlx" in installed_backends():
        return "mlx"
    return default_backend()


def load_eval_model(model_dir: str | os.PathLike[str], backend: str | None = None,
                    adapter_path: str | os.PathLike[str] | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_length: int | None = None,
                    dtype: str | None = None, device: str | None = None) -> EvalModel:
    """Load a model directory for evaluation on BACKEND (default: `default_backend()`)."""
    directory = require_model_dir(resolve(model_dir))
    tokenizer = Tokenizer(require_tokenizer(directory))
    spec = read_spec(directory)
    if tokenizer.vocab_size > spec.vocab_size:
        raise ElmError(f"{directory}: tokenizer has {tokenizer.vocab_size} pieces but the model "
                       f"only {spec.vocab_size} embeddings")
    quantized = is_quantized(directory)
    backend = backend or chosen_backend(directory)
    if backend not in BACKENDS:
        raise ElmError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if importlib.util.find_spec(backend) is None:
        raise ElmError(f"backend {backend!r} is not installed here "
                       f"(installed: {', '.join(installed_backends()) or 'none'})")
    length = max_length or spec.max_context_length
    if length > spec.max_context_length:
        raise ElmError(f"--context-length {length} is longer than the model was built for "
                       f"(max_context_length {spec.max_context_length} in "
                       f"{directory / CONFIG_FILE})")
    if backend == "torch":
        if quantized:
            raise ElmError(f"{directory}: is a quantized MLX directory: evaluate it as it is with "
                           "--backend mlx, or write a PyTorch one with "
                           f"`elm convert {model_dir} DST --to torch`")
        if adapter_path is not None:
            raise ElmError("adapters need the mlx backend; for torch, fuse them first with `elm fuse`")
        from elm_eval.torch_model import TorchEvalModel

        return TorchEvalModel(directory, tokenizer, length, batch_size, dtype=dtype, device=device)
    if device not in (None, "cpu", "gpu"):
        raise ElmError(f"device {device!r} is not an MLX device (cpu or gpu)")
    from elm_eval.mlx_model import MLXEvalModel

    return MLXEvalModel(directory, tokenizer, length, batch_size, adapter_path=adapter_path,
                        dtype=dtype, device=device)
