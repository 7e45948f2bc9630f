"""How Apple's HF reader sees an OpenELM `config.json` (docs/reference.md section 2); the lossless
mapping itself is `ModelSpec.from_config` / `ModelSpec.to_config` in elm_spec.spec.

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

from collections.abc import Mapping
from typing import Any

import numpy as np

from elm_spec.spec import AUTO_MAP, ModelSpec, make_divisible  # noqa: F401  (AUTO_MAP: part of this module's API)

APPLE_RMS_NORM_EPS = 1e-6  # hard-coded in Apple's modeling code

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
        shapes = apple_reader_shapes(spec.to_config())
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
