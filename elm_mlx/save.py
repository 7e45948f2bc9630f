"""Writing an MLX model (plain or quantized) as a model directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import save_model

from elm_spec.modeldir import (
    CONFIG_FILE,
    atomic_output_dir,
    copy_tokenizer_files,
    read_json,
    write_json,
)
from elm_spec.tokenizer import TOKENIZER_CONFIG_FILE


def save_mlx_model_dir(model: nn.Module, config: dict[str, Any], tokenizer_dir: Path,
                       destination: str | os.PathLike[str], force: bool = False,
                       chat_template: str | None = None) -> Path:
    """Weights (sharded at 5 GB by mlx-lm's writer), config.json and the tokenizer files of
    TOKENIZER_DIR (with CHAT_TEMPLATE set in tokenizer_config.json when given), written to a
    temporary directory renamed into place."""
    destination = Path(destination)
    with atomic_output_dir(destination, force=force) as staging:
        save_model(staging, model)
        write_json(staging / CONFIG_FILE, config)
        copy_tokenizer_files(tokenizer_dir, staging)
        if chat_template is not None:
            tokenizer_config = staging / TOKENIZER_CONFIG_FILE
            write_json(tokenizer_config, {**read_json(tokenizer_config),
                                          "chat_template": chat_template})
    return destination
