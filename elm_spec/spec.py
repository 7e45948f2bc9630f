"""OpenELM layer-wise scaling: the one description of a model both twins are built from.

Per layer i of N: a_i = round(linspace(a_min, a_max, N)[i], 2) scales the query width,
b_i the FFN width (docs/reference.md section 1). A single multiplier means uniform layers; a list of
N multipliers is taken as given (that is what HF config.json files carry for the FFN).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from elm_spec.errors import ElmError
from elm_spec.presets import PRESETS


def make_divisible(value: float, divisor: int) -> int:
    """OpenELM's rounding of a width to a multiple of `divisor`, never more than 10% down."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def expand_multipliers(multipliers: Sequence[float], num_layers: int) -> list[float]:
    """One multiplier per layer: uniform (1 value), linspace rounded to 2 decimals (2), or as given (N)."""
    if len(multipliers) == 1:
        return [float(multipliers[0])] * num_layers
    if len(multipliers) == num_layers:
        return [float(m) for m in multipliers]
    if len(multipliers) == 2:
        return [round(float(v), 2) for v in np.linspace(multipliers[0], multipliers[1], num=num_layers)]
    raise ValueError(f"expected 1, 2 or {num_layers} multipliers, got {len(multipliers)}")


def _as_multipliers(value: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),)
    return tuple(float(v) for v in value)


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """Shape of an OpenELM-style decoder. Fields and their names follow HF apple/OpenELM.

    Two specs are equal when they describe the same model: `(0.5, 4.0)` and the expanded
    per-layer list it produces are the same FFN multipliers.
    """

    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_gqa_groups: int = 4
    qkv_multipliers: tuple[float, ...] = (0.5, 1.0)
    ffn_multipliers: tuple[float, ...] = (0.5, 4.0)
    ffn_dim_divisor: int = 256
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    vocab_size: int = 32000
    max_context_length: int = 2048
    rope_freq_constant: int = 10000
    rope_max_length: int = 4096
    rms_norm_eps: float = 1e-6
    bos_token_id: int = 1
    eos_token_id: int = 2
    # Explicit per-layer query heads, when a config gives heads that the multipliers do not imply.
    query_heads_override: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "qkv_multipliers", _as_multipliers(self.qkv_multipliers))
        object.__setattr__(self, "ffn_multipliers", _as_multipliers(self.ffn_multipliers))
        if self.query_heads_override is not None:
            object.__setattr__(self, "query_heads_override", tuple(int(h) for h in self.query_heads_override))
        self._validate()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.to_config() == other.to_config()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_config(), sort_keys=True))

    # ----- validation -------------------------------------------------------------------
    def _validate(self) -> None:
        def need(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise ElmError(f"invalid model spec: {key}: {message}")

        for key in ("num_transformer_layers", "model_dim", "head_dim", "num_gqa_groups",
                    "ffn_dim_divisor", "vocab_size", "max_context_length", "rope_max_length"):
            value = getattr(self, key)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                 f"must be a positive integer, got {value!r}")
        need(self.model_dim % self.head_dim == 0, "head_dim",
             f"{self.head_dim} does not divide model_dim {self.model_dim}")
        need(self.head_dim % 2 == 0, "head_dim", f"{self.head_dim} must be even for rotary embeddings")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_freq_constant > 0, "rope_freq_constant", "must be positive")
        for key in ("qkv_multipliers", "ffn_multipliers"):
            values = getattr(self, key)
            need(len(values) in (1, 2, self.num_transformer_layers), key,
                 f"expected 1, 2 or {self.num_transformer_layers} values, got {len(values)}")
            need(all(v > 0 for v in values), key, "multipliers must be positive")
        if self.query_heads_override is not None:
            need(len(self.query_heads_override) == self.num_transformer_layers, "num_query_heads",
                 f"expected {self.num_transformer_layers} values, got {len(self.query_heads_override)}")
        for layer, heads in enumerate(self.num_query_heads):
            need(heads > 0 and heads % self.num_gqa_groups == 0, "num_query_heads",
                 f"layer {layer} has {heads} query heads, not divisible by num_gqa_groups "
                 f"{self.num_gqa_groups}")
        need(self.bos_token_id < self.vocab_size and self.eos_token_id < self.vocab_size,
             "vocab_size", f"{self.vocab_size} leaves no room for bos/eos ids")

    # ----- per-layer dimensions ---------------------------------------------------------
    @cached_property
    def layer_qkv_multipliers(self) -> list[float]:
        return expand_multipliers(self.qkv_multipliers, self.num_transformer_layers)

    @cached_property
    def layer_ffn_multipliers(self) -> list[float]:
        return expand_multipliers(self.ffn_multipliers, self.num_transformer_layers)

    @cached_property
    def num_query_heads(self) -> list[int]:
        if self.query_heads_override is not None:
            return list(self.query_heads_override)
        divisor = self.head_dim * self.num_gqa_groups
        return [make_divisible(self.model_dim * m, divisor) // self.head_dim
                for m in self.layer_qkv_multipliers]

    @cached_property
    def num_kv_heads(self) -> list[int]:
        return [heads // self.num_gqa_groups for heads in self.num_query_heads]

    @cached_property
    def ffn_dims(self) -> list[int]:
        return [make_divisible(m * self.model_dim, self.ffn_dim_divisor)
                for m in self.layer_ffn_multipliers]

    # ----- counts -----------------------------------------------------------------------
    def layer_matmul_parameters(self, layer: int) -> int:
        d, h = self.model_dim, self.head_dim
        q, kv, f = self.num_query_heads[layer], self.num_kv_heads[layer], self.ffn_dims[layer]
        qkv = d * (q + 2 * kv) * h
        out = q * h * d
        ffn_in = d * (2 * f if self.ffn_with_glu else f)
        return qkv + out + ffn_in + f * d

    def layer_norm_parameters(self) -> int:
        return 2 * self.model_dim + (2 * self.head_dim if self.normalize_qk_projections else 0)

    def num_parameters(self) -> int:
        """Exact count of stored parameters (the tied embedding counted once)."""
        embedding = self.vocab_size * self.model_dim
        head = 0 if self.share_input_output_layers else embedding
        layers = sum(self.layer_matmul_parameters(i) + self.layer_norm_parameters()
                     for i in range(self.num_transformer_layers))
        return embedding + head + layers + self.model_dim

    def num_matmul_parameters(self) -> int:
        """Weights that multiply activations: every block linear plus the output projection."""
        blocks = sum(self.layer_matmul_parameters(i) for i in range(self.num_transformer_layers))
        return blocks + self.vocab_size * self.model_dim

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 N_matmul + 12 sum_i(nq_i h) T (docs/reference.md section 6)."""
        attention = 12 * sum(q * self.head_dim for q in self.num_query_heads) * seq_len
        return 6 * self.num_matmul_parameters() + attention

    # ----- construction -----------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelSpec:
        if name not in PRESETS:
            raise ElmError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSpec:
        return spec_from_config(config)

    def to_config(self, torch_dtype: str = "float32") -> dict[str, Any]:
        return config_from_spec(self, torch_dtype)

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    @property
    def is_layerwise(self) -> bool:
        return len(set(self.num_query_heads)) > 1 or len(set(self.ffn_dims)) > 1

    def describe(self) -> str:
        millions = self.num_parameters() / 1e6
        kind = "layer-wise" if self.is_layerwise else "uniform"
        return (f"{self.num_transformer_layers} layers x {self.model_dim}, head_dim {self.head_dim}, "
                f"{self.num_gqa_groups} GQA groups, {kind}, vocab {self.vocab_size}, "
                f"{millions:,.1f}M parameters")


# ----- config.json (HF apple/OpenELM layout) -----------------------------------------------
# Apple's configuration_openelm.py / modeling_openelm.py, in every apple/OpenELM-* repository.
APPLE_CODE_REPO = "apple/OpenELM-270M"
AUTO_MAP = {
    "AutoConfig": f"{APPLE_CODE_REPO}--configuration_openelm.OpenELMConfig",
    "AutoModelForCausalLM": f"{APPLE_CODE_REPO}--modeling_openelm.OpenELMForCausalLM",
}
# The release Apple's code runs on unpatched; written when transformers is not installed.
APPLE_TRANSFORMERS_VERSION = "4.39.3"

# Keys HF, mlx-lm and elm write that do not change the architecture.
INFORMATIONAL_KEYS = frozenset({
    "model_type", "architectures", "torch_dtype", "transformers_version", "auto_map",
    "_name_or_path", "initializer_range", "use_cache", "activation_fn_name",
    "normalization_layer_name", "quantization", "quantization_config", "num_kv_heads",
    "pad_token_id", "tie_word_embeddings", "max_position_embeddings",
})

def spec_from_config(config: Mapping[str, Any]) -> ModelSpec:
    """The spec a config.json describes; unknown or unsupported keys are refused by name."""
    spec_keys = frozenset(f.name for f in dataclasses.fields(ModelSpec)) - {"query_heads_override"}
    model_type = config.get("model_type", "openelm")
    if model_type != "openelm":
        raise ElmError(f"config.json: model_type {model_type!r} is not supported (expected 'openelm')")
    unknown = sorted(set(config) - spec_keys - INFORMATIONAL_KEYS - {"num_query_heads"})
    if unknown:
        raise ElmError(f"config.json: unknown key {unknown[0]!r}")
    for key in ("num_transformer_layers", "model_dim", "head_dim"):
        if key not in config:
            raise ElmError(f"config.json: missing key {key!r}")
    fields = {k: _plain(v) for k, v in config.items() if k in spec_keys}
    if config.get("activation_fn_name", "swish") not in ("swish", "silu"):
        raise ElmError(f"config.json: activation_fn_name {config['activation_fn_name']!r} is not supported")
    if config.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise ElmError(f"config.json: normalization_layer_name "
                       f"{config['normalization_layer_name']!r} is not supported")
    spec = ModelSpec(**fields)
    query_heads = config.get("num_query_heads")
    if query_heads is not None and list(query_heads) != spec.num_query_heads:
        spec = spec.replace(query_heads_override=tuple(query_heads))
    kv_heads = config.get("num_kv_heads")
    if kv_heads is not None and list(kv_heads) != spec.num_kv_heads:
        raise ElmError(f"config.json: num_kv_heads {list(kv_heads)} disagrees with num_query_heads / "
                       f"num_gqa_groups {spec.num_kv_heads}")
    return spec


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def config_from_spec(spec: ModelSpec, torch_dtype: str = "float32") -> dict[str, Any]:
    """config.json for SPEC, as Apple's releases write it plus the keys listed in hf_config."""
    qkv = list(spec.qkv_multipliers) if len(spec.qkv_multipliers) > 1 else spec.qkv_multipliers[0]
    return {
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "num_transformer_layers": spec.num_transformer_layers,
        "model_dim": spec.model_dim,
        "head_dim": spec.head_dim,
        "num_gqa_groups": spec.num_gqa_groups,
        "qkv_multipliers": qkv,
        "ffn_multipliers": spec.layer_ffn_multipliers,
        "num_query_heads": spec.num_query_heads,
        "num_kv_heads": spec.num_kv_heads,
        "ffn_dim_divisor": spec.ffn_dim_divisor,
        "ffn_with_glu": spec.ffn_with_glu,
        "normalize_qk_projections": spec.normalize_qk_projections,
        "share_input_output_layers": spec.share_input_output_layers,
        "rope_freq_constant": spec.rope_freq_constant,
        "rope_max_length": spec.rope_max_length,
        "max_context_length": spec.max_context_length,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "activation_fn_name": "swish",
        "normalization_layer_name": "rms_norm",
        "initializer_range": 0.02,
        "torch_dtype": torch_dtype,
        "tie_word_embeddings": spec.share_input_output_layers,
        "use_cache": True,
        "max_position_embeddings": spec.max_context_length,
        "auto_map": dict(AUTO_MAP),
        "transformers_version": _transformers_version(),
    }


def _transformers_version() -> str:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return APPLE_TRANSFORMERS_VERSION
