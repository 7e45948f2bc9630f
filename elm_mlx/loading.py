"""Loading model directories (plain or quantized) into the MLX twin, with optional adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_model as mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from elm_mlx.model import Model
from elm_spec import ElmError, ModelSpec
from elm_spec.chat_template import chat_template_for
from elm_spec.errors import first_line
from elm_spec.hub import resolve
from elm_spec.modeldir import check_tensors, read_config, read_spec, require_model_dir
from elm_spec.names import DTYPE_NAMES
from elm_spec.tokenizer import (
    FAST_TOKENIZER_FILE,
    SENTENCEPIECE_FILE,
    Tokenizer,
    require_tokenizer,
)


class _SpecArgs:
    """What mlx-lm's loader calls `ModelArgs`: here the ModelSpec read from config.json."""

    @staticmethod
    def from_dict(config: dict[str, Any]) -> ModelSpec:
        return ModelSpec.from_config(config)


MLX_DTYPES: dict[str, mx.Dtype] = {name: getattr(mx, name) for name in DTYPE_NAMES}


def mlx_dtype(name: str, flag: str = "--dtype") -> mx.Dtype:
    if name not in MLX_DTYPES:
        raise ElmError(f"{flag} {name!r}: choose from {', '.join(MLX_DTYPES)}")
    return MLX_DTYPES[name]


def _model_classes(config: dict[str, Any]) -> tuple[type[nn.Module], type]:
    return Model, _SpecArgs


def load_model(path: str | os.PathLike[str], lazy: bool = False) -> Model:
    """The MLX twin of a model directory (or Hub repo); quantized weights are loaded quantized."""
    directory = resolve(path)
    read_spec(directory)
    config = read_config(directory)
    check_tensors(directory, ModelSpec.from_config(config), config.get("quantization"))
    try:
        model, _ = mlx_lm_load_model(directory, lazy=lazy, get_model_classes=_model_classes)
    except ValueError as error:
        raise ElmError(f"{directory}: cannot load weights ({error})") from None
    return model


def load_adapters(model: Model, adapter_path: str | os.PathLike[str]) -> Model:
    from mlx_lm.utils import load_adapters as mlx_lm_load_adapters

    directory = resolve(adapter_path)
    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (directory / name).is_file():
            raise ElmError(f"{directory}: no {name} (not an adapter directory)")
    try:
        mlx_lm_load_adapters(model, str(directory))
    except ValueError as error:
        lines = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in lines[:3])
        raise ElmError(f"{directory}: adapters do not fit this model ({detail})"
                       f"{_trained_on(directory)}") from None
    model.eval()
    return model


def _trained_on(directory: Path) -> str:
    """The base model the adapters record (mlx-lm's adapter_config.json `model`), as advice."""
    try:
        base = json.loads((directory / "adapter_config.json").read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return ""
    return f"; they were fine-tuned on {base}: pass --model {base}" if isinstance(base, str) else ""


def load(path: str | os.PathLike[str], adapter_path: str | os.PathLike[str] | None = None,
         lazy: bool = False, chat_template: str | None = None) -> tuple[Model, TokenizerWrapper]:
    """`(model, tokenizer)` for a model directory or Hub repo, as `mlx_lm.load` returns them.

    The tokenizer's chat template follows `elm_spec.chat_template`'s rule: CHAT_TEMPLATE (a
    file, or "none") if given, else the adapters' recorded template, else the model's own.
    """
    path = resolve(path)
    adapter_path = resolve(adapter_path) if adapter_path is not None else None
    require_model_dir(path)
    require_tokenizer(path)
    template = chat_template_for(path, adapter_path, chat_template)
    model = load_model(path, lazy=lazy)
    if adapter_path is not None:
        load_adapters(model, adapter_path)
    tokenizer = read_tokenizer(Path(path), model.spec.eos_token_id)
    check_tokenizer_fits(tokenizer, model.spec.vocab_size, Path(path))
    set_chat_template(tokenizer, template)
    return model, tokenizer


def set_chat_template(tokenizer: TokenizerWrapper, template: str | None) -> None:
    """Make TEMPLATE (None: no template) the one `tokenizer.apply_chat_template` renders."""
    tokenizer._tokenizer.chat_template = template
    tokenizer.has_chat_template = template is not None


def check_tokenizer_fits(tokenizer: TokenizerWrapper, rows: int, directory: Path) -> None:
    """Every token id the tokenizer can produce must have an embedding row: MLX does not
    bounds-check the lookup (garbage, NaN or a crash instead of an error)."""
    ids = tokenizer.get_vocab().values()
    count = max(ids) + 1 if ids else 0
    if count > rows:
        raise ElmError(f"{directory}: the tokenizer has {count} token ids, more than the model's "
                       f"{rows} embedding rows (vocab_size in config.json)")


def read_tokenizer(directory: Path, eos_token_id: int) -> TokenizerWrapper:
    """mlx-lm's tokenizer for DIRECTORY. transformers 5 reads config.json to pick a tokenizer
    class; its `auto_map` names Apple's remote code, which a tokenizer never needs, so remote
    code is declined up front (otherwise transformers asks on the terminal) and the warning that
    `openelm` is not a model type it knows is silenced: the class comes from
    tokenizer_config.json."""
    from transformers.utils import logging as hf_logging

    if not (directory / FAST_TOKENIZER_FILE).is_file():
        # transformers reads a damaged tokenizer.model as tiktoken and asks to install it
        Tokenizer(directory / SENTENCEPIECE_FILE)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load_tokenizer(directory, {"trust_remote_code": False}, eos_token_ids=eos_token_id)
    except ValueError as error:  # json.JSONDecodeError and transformers' own refusals
        raise ElmError(f"{directory}: cannot read its tokenizer ({first_line(error)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
