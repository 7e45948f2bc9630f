"""Lossless mapping between ModelSpec and HF apple/OpenELM `config.json` (FACTS.md section 2).

The written config carries the expanded per-layer lists (`ffn_multipliers`, `num_query_heads`,
`num_kv_heads`) that mlx-lm's `openelm` model reads directly, `tie_word_embeddings` (without it
transformers 4.x ties an untied `lm_head` to the embedding in Apple's code), `use_cache`,
`max_position_embeddings` (the window lm-eval's `hf` model uses) and an `auto_map` naming
Apple's remote code, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
builds the model where the Hub is reachable. MLX directories (`elm convert` to MLX, `elm fuse`
without `--export`) leave `auto_map` out: under transformers 5, `AutoTokenizer` (and so
`mlx_lm.load`) reads config.json and, finding remote code, asks on the terminal whether to run
it. `apple_reader_mismatch` says when Apple's reader would build other shapes than the spec's.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import numpy as np

from elm_spec.errors import ElmError
from elm_spec.spec import ModelSpec, make_divisible

# Apple's configuration_openelm.py / modeling_openelm.py, in every apple/OpenELM-* repository.
APPLE_CODE_REPO = "apple/OpenELM-270M"
AUTO_MAP = {
    "AutoConfig": f"{APPLE_CODE_REPO}--configuration_openelm.OpenELMConfig",
    "AutoModelForCausalLM": f"{APPLE_CODE_REPO}--modeling_openelm.OpenELMForCausalLM",
}
APPLE_RMS_NORM_EPS = 1e-6  # hard-coded in Apple's modeling code
# The release Apple's code runs on unpatched; written when transformers is not installed.
APPLE_TRANSFORMERS_VERSION = "4.39.3"

# Keys HF, mlx-lm and elm write that do not change the architecture.
INFORMATIONAL_KEYS = frozenset({
    "model_type", "architectures", "torch_dtype", "transformers_version", "auto_map",
    "_name_or_path", "initializer_range", "use_cache", "activation_fn_name",
    "normalization_layer_name", "quantization", "quantization_config", "num_kv_heads",
    "pad_token_id", "tie_word_embeddings", "max_position_embeddings",
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


def apple_reader_shapes(config: Mapping[str, Any]) -> dict[str, list[int]]:
    """Per-layer query heads, kv heads and FFN widths as Apple's OpenELM reader derives them
    from CONFIG (docs/reference.md): it recomputes the heads from `qkv_multipliers` (one number,
    or two endpoints rounded per layer; a longer list is refused) and takes `ffn_multipliers` as
    one number, two endpoints (rounded) or one per layer."""
    layers, dim, head = config["num_transformer_layers"], config["model_dim"], config["head_dim"]
    groups = config["num_gqa_groups"]

    def per_layer(value: Any, key: str) -> list[float]:
        if isinstance(value, (int, float)):
            return [float(value)] * layers
        if len(value) == 2:
            return [round(float(v), 2) for v in np.linspace(value[0], value[1], num=layers)]
        if key == "ffn_multipliers" and len(value) == layers:
            return [float(v) for v in value]
        raise ValueError(f"{key}: {len(value)} values (Apple's reader takes one or two"
                         + (f" or {layers}" if key == "ffn_multipliers" else "") + ")")

    query = [make_divisible(dim * m, head * groups) // head
             for m in per_layer(config["qkv_multipliers"], "qkv_multipliers")]
    ffn = [make_divisible(m * dim, config["ffn_dim_divisor"])
           for m in per_layer(config["ffn_multipliers"], "ffn_multipliers")]
    return {"num_query_heads": query, "num_kv_heads": [q // groups for q in query], "ffn_dims": ffn}


def apple_reader_mismatch(spec: ModelSpec) -> str | None:
    """Why Apple's HF reader would not build SPEC from the config elm writes, or None."""
    if spec.rms_norm_eps != APPLE_RMS_NORM_EPS:
        return f"rms_norm_eps {spec.rms_norm_eps:g} (Apple's code fixes it at 1e-6)"
    try:
        shapes = apple_reader_shapes(config_from_spec(spec))
    except ValueError as error:
        return str(error)
    ours = {"num_query_heads": spec.num_query_heads, "num_kv_heads": spec.num_kv_heads,
            "ffn_dims": spec.ffn_dims}
    for key, values in ours.items():
        if shapes[key] != values:
            return f"{key} {shapes[key]} where this model has {values}"
    return None


def reader_notes(spec: ModelSpec, directory: object) -> list[str]:
    """One line for each well-known reader that cannot load the model directory DIRECTORY."""
    notes = []
    reason = apple_reader_mismatch(spec)
    if reason is not None:
        notes.append(f"note: {directory} will not load in Apple's OpenELM code "
                     f"(transformers trust_remote_code): {reason}")
    if not spec.ffn_with_glu:
        notes.append(f"note: mlx_lm.load cannot load {directory} (mlx-lm's openelm model always "
                     "uses a gated FFN); elm_mlx.load and elm's PyTorch side can")
    return notes
