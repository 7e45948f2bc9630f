"""Lossless mapping between ModelSpec and HF apple/OpenELM `config.json` (FACTS.md section 2).

The written config carries the expanded per-layer lists (`ffn_multipliers`, `num_query_heads`,
`num_kv_heads`) that mlx-lm's `openelm` model reads directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elm_spec.errors import ElmError
from elm_spec.spec import ModelSpec

# Keys HF, mlx-lm and elm write that do not change the architecture.
INFORMATIONAL_KEYS = frozenset({
    "model_type", "architectures", "torch_dtype", "transformers_version", "auto_map",
    "_name_or_path", "initializer_range", "use_cache", "activation_fn_name",
    "normalization_layer_name", "quantization", "quantization_config", "num_kv_heads",
    "pad_token_id", "tie_word_embeddings",
})

SPEC_KEYS = frozenset(f.name for f in ModelSpec.__dataclass_fields__.values()) - {"query_heads_override"}


def spec_from_config(config: Mapping[str, Any]) -> ModelSpec:
    model_type = config.get("model_type", "openelm")
    if model_type != "openelm":
        raise ElmError(f"config.json: model_type {model_type!r} is not supported (expected 'openelm')")
    unknown = sorted(set(config) - SPEC_KEYS - INFORMATIONAL_KEYS - {"num_query_heads"})
    if unknown:
        raise ElmError(f"config.json: unknown key {unknown[0]!r}")
    for key in ("num_transformer_layers", "model_dim", "head_dim"):
        if key not in config:
            raise ElmError(f"config.json: missing key {key!r}")
    fields = {k: _plain(v) for k, v in config.items() if k in SPEC_KEYS}
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
    }
