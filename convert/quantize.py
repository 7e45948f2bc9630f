"""Affine quantization in mlx-lm's format, and the OpenELM-aware mixed recipes.

mlx-lm's own mixed recipes (`--quant-predicate mixed_4_6` ...) look for Llama's `down_proj` and
`v_proj` and stop with "Model does not have expected keys for mixed quant." on OpenELM. The
recipes here name OpenELM's modules instead: the tied embedding (which is also the output
head) and the residual-stream writers `out_proj` and `proj_2` keep more bits; per-module
settings go into config.json's `quantization` keyed by module path, which both mlx-lm's
loader and elm's read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from elm_spec import ElmError, ModelSpec
from elm_spec.names import MLX_GROUP_SIZES

Q_BITS = (4, 8)
Q_GROUP_SIZES = MLX_GROUP_SIZES
# recipe -> bits of the sensitive modules; the rest get --q-bits
RECIPES: dict[str, int] = {"mixed_4_6": 6, "mixed_4_8": 8}
QUANTIZED_SUFFIXES = ("token_embeddings", "lm_head", "qkv_proj", "out_proj", "proj_1", "proj_2")


@dataclass(frozen=True)
class QuantSettings:
    bits: int
    group_size: int

    def as_config(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": "affine"}


def check_settings(bits: int, group_size: int, recipe: str | None) -> None:
    if bits not in Q_BITS:
        raise ElmError(f"--q-bits {bits} is not supported; choose from {', '.join(map(str, Q_BITS))}")
    if group_size not in Q_GROUP_SIZES:
        raise ElmError(f"--q-group-size {group_size} is not supported; choose from "
                       f"{', '.join(map(str, Q_GROUP_SIZES))}")
    if recipe is not None and recipe not in RECIPES:
        raise ElmError(f"unknown --q-recipe {recipe!r}; choose from {', '.join(RECIPES)}")
    if recipe is not None and bits != 4:
        raise ElmError(f"--q-recipe {recipe} quantizes the bulk of the weights to 4 bits; "
                       "drop --q-bits or set it to 4")


def uses_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's Q4_K_M layer choice (also mlx-lm's): the first and last eighth, every third between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


def plan_quantization(spec: ModelSpec, shapes: Mapping[str, tuple[int, ...]], bits: int,
                      group_size: int, recipe: str | None) -> dict[str, QuantSettings]:
    """Module path -> settings, for every weight that gets quantized (the rest stay in --dtype)."""
    default = QuantSettings(bits, group_size)
    high = QuantSettings(RECIPES[recipe], group_size) if recipe else default
    plan: dict[str, QuantSettings] = {}
    for name, shape in shapes.items():
        module = name[: -len(".weight")]
        if len(shape) != 2 or not module.endswith(QUANTIZED_SUFFIXES) or shape[-1] % group_size:
            continue
        settings = default
        if recipe is not None:
            if module.endswith(("token_embeddings", "lm_head", "out_proj")):
                settings = high
            elif module.endswith("proj_2"):
                layer = int(module.split(".")[2])
                settings = high if uses_more_bits(layer, spec.num_transformer_layers) else default
        plan[module] = settings
    return plan


def quantization_config(plan: Mapping[str, QuantSettings], bits: int, group_size: int
                        ) -> dict[str, Any]:
    """config.json's `quantization`: the default, plus an entry per module that differs."""
    default = QuantSettings(bits, group_size)
    config: dict[str, Any] = default.as_config()
    for module, settings in plan.items():
        if settings != default:
            config[module] = settings.as_config()
    return config


def quantized_shapes(shape: tuple[int, ...], settings: QuantSettings) -> dict[str, tuple[int, ...]]:
    rows, columns = shape
    return {"weight": (rows, columns * settings.bits // 32),
            "scales": (rows, columns // settings.group_size),
            "biases": (rows, columns // settings.group_size)}


def quantize(weight: Any, settings: QuantSettings) -> tuple[Any, Any, Any]:
    import mlx.core as mx

    return mx.quantize(weight, group_size=settings.group_size, bits=settings.bits)


def settings_for(module: str, quantization: Mapping[str, Any]) -> QuantSettings:
    entry = quantization.get(module)
    if not isinstance(entry, Mapping):
        entry = quantization
    if entry.get("mode", "affine") != "affine":
        raise ElmError(f"quantization mode {entry['mode']!r} of {module} is not supported (affine only)")
    return QuantSettings(int(entry["bits"]), int(entry["group_size"]))


def dequantize(weight: Any, scales: Any, biases: Any, module: str,
               quantization: Mapping[str, Any]) -> Any:
    import mlx.core as mx

    settings = settings_for(module, quantization)
    # In float32, as MLX's quantized kernels apply scales and biases: one rounding at most, by
    # the caller's cast, instead of arithmetic in the scales' bfloat16.
    return mx.dequantize(weight, scales.astype(mx.float32), biases.astype(mx.float32),
                         group_size=settings.group_size, bits=settings.bits)
