"""LoRA, DoRA and full fine-tuning set-up on the MLX twin, and adapters in mlx-lm's format.

The LoRA and DoRA layers are mlx-lm's own (`linear_to_lora_layers`), so what is written here
(`adapters.safetensors` with the trainable tensors, `adapter_config.json` with
`fine_tune_type`, `num_layers` and `lora_parameters`) loads in `mlx_lm.load(...,
adapter_path=...)` and in `elm_mlx.load(..., adapter_path=...)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from elm_mlx.lora.config import FinetuneConfig
from elm_spec import ElmError
from elm_spec.writes import writing

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
               for _, m in model.named_modules())


def layers_to_tune(model: nn.Module, requested: int) -> int:
    """mlx-lm tunes the last 16 blocks and errors on smaller models; here -1 or any number
    beyond the model's depth means every block."""
    total = len(model.layers)
    return total if requested < 0 or requested > total else requested


def apply_fine_tune(model: nn.Module, config: FinetuneConfig) -> int:
    """Freeze the base and make the tuned part trainable; returns the number of blocks tuned."""
    num_layers = layers_to_tune(model, config.num_layers)
    model.freeze()
    if config.fine_tune_type == "full":
        if is_quantized(model):
            raise ElmError(f"{config.model}: is quantized; full fine-tuning needs an unquantized "
                           "model (use --fine-tune-type lora or dora for QLoRA)")
        for layer in model.layers[len(model.layers) - num_layers:]:
            layer.unfreeze()
    else:
        linear_to_lora_layers(model, num_layers, config.lora_parameters(),
                              use_dora=config.fine_tune_type == "dora")
    return num_layers


def trainable_weights(model: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(config: FinetuneConfig, num_layers: int, chat_template: str | None
                   ) -> dict[str, Any]:
    """mlx-lm's adapter_config.json: the keys its loader reads, the run's settings, and the
    chat template the data was rendered with (which `elm fuse` passes on to the tokenizer)."""
    settings = {key: value for key, value in vars(config).items()
                if key not in ("rank", "alpha", "scale", "dropout", "keys", "resume")}
    return {**settings, "fine_tune_type": config.fine_tune_type, "num_layers": num_layers,
            "lora_parameters": config.lora_parameters(), "chat_template": chat_template}


def save_safetensors_atomic(path: Path, arrays: dict[str, mx.array]) -> None:
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.safetensors")
    with writing(path):
        try:
            mx.save_safetensors(str(temporary), arrays)
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def write_adapter_weights(directory: Path, model: nn.Module) -> None:
    save_safetensors_atomic(directory / ADAPTER_WEIGHTS, trainable_weights(model))
