"""Merging adapters into the base weights, and exporting the result for the PyTorch twin."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_map, tree_unflatten
from mlx_lm.utils import dequantize_model

from elm_mlx.loading import load_adapters, load_model, mlx_dtype
from elm_mlx.save import save_mlx_model_dir
from elm_spec import ElmError
from elm_spec.chat_template import chat_template_for
from elm_spec.hub import resolve
from elm_spec.modeldir import read_config
from elm_spec.outputs import refuse_overlap
from elm_spec.tokenizer import require_tokenizer


def fused_model(model_dir: str | os.PathLike[str], adapter_path: str | os.PathLike[str],
                dequantize: bool) -> nn.Module:
    """The base model with its adapters merged (mlx-lm's `fuse` on each LoRA/DoRA layer); a
    quantized base is re-quantized with its own group size and bits unless DEQUANTIZE."""
    model = load_model(model_dir)
    load_adapters(model, adapter_path)
    fused = [(name, module.fuse(dequantize=dequantize))
             for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
    return model


def fuse(model_dir: str | os.PathLike[str], adapter_path: str | os.PathLike[str],
         save_path: str | os.PathLike[str], dequantize: bool = False, export: bool = False,
         dtype: str | None = None, force: bool = False) -> Path:
    """Write the fused model: an MLX model directory, or with EXPORT the interchange format
    (unquantized, DTYPE float32 by default) that elm_train.load_model reads."""
    source, adapter_path = resolve(model_dir), resolve(adapter_path)
    refuse_overlap(source, save_path)
    refuse_overlap(adapter_path, save_path)
    require_tokenizer(source)
    config = read_config(source)
    model = fused_model(source, adapter_path, dequantize=dequantize or export)
    if export or dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if export or dtype is not None:
        name = dtype or "float32"
        target = mlx_dtype(name)
        if "quantization" in config:
            raise ElmError("--dtype applies to unquantized output; add --dequantize or --export")
        model.update(tree_map(lambda w: w.astype(target), model.parameters()))
        config["torch_dtype"] = name
    if export:
        config = model.spec.to_config(torch_dtype=config["torch_dtype"])
    else:
        config.pop("auto_map", None)  # an MLX directory: see elm_spec.hf_config
    # The fused tokenizer carries the template the adapted model answers in (the adapters'
    # recorded one first), so the fused model is prompted as `generate --adapter-path` was.
    return save_mlx_model_dir(model, config, source, save_path, force=force,
                              chat_template=chat_template_for(source, adapter_path))
