"""Named model shapes: Apple's OpenELM releases, the bottleneck study's LLaMA-style sizes,
and small shapes for tests and the demo."""

from __future__ import annotations

from typing import Any

_OPENELM = dict(num_gqa_groups=4, qkv_multipliers=(0.5, 1.0), ffn_multipliers=(0.5, 4.0),
                ffn_dim_divisor=256, vocab_size=32000, max_context_length=2048)


def _llama_style(layers: int, width: int, head_dim: int) -> dict[str, Any]:
    """The study's LLaMA-style models: uniform layers, multi-head attention, SwiGLU at 8/3 d,
    untied embeddings, no qk-norm (docs/reference.md section 4)."""
    return dict(num_transformer_layers=layers, model_dim=width, head_dim=head_dim,
                num_gqa_groups=1, qkv_multipliers=(1.0,), ffn_multipliers=(8 / 3,),
                ffn_dim_divisor=256, normalize_qk_projections=False,
                share_input_output_layers=False, vocab_size=32000, max_context_length=2048)


# ModelSpec keyword arguments by name (ModelSpec.from_preset builds them).
PRESETS: dict[str, dict[str, Any]] = {
    "OpenELM-270M": dict(num_transformer_layers=16, model_dim=1280, head_dim=64, **_OPENELM),
    "OpenELM-450M": dict(num_transformer_layers=20, model_dim=1536, head_dim=64, **_OPENELM),
    "OpenELM-1_1B": dict(num_transformer_layers=28, model_dim=2048, head_dim=64, **_OPENELM),
    "OpenELM-3B": dict(num_transformer_layers=36, model_dim=3072, head_dim=128, **_OPENELM),
    "llama-100M": _llama_style(9, 864, 96),
    "llama-500M": _llama_style(15, 1536, 128),
    "llama-1B": _llama_style(19, 1920, 128),
    "llama-2B": _llama_style(24, 2496, 96),
    # Small layer-wise shapes for tests, the demo and CPU benchmarks.
    "elm-tiny": dict(num_transformer_layers=4, model_dim=64, head_dim=16, num_gqa_groups=2,
                          ffn_dim_divisor=32, vocab_size=512, max_context_length=256),
    "elm-small": dict(num_transformer_layers=6, model_dim=256, head_dim=32,
                           num_gqa_groups=2, ffn_dim_divisor=64, vocab_size=2048,
                           max_context_length=512),
    "elm-demo": dict(num_transformer_layers=6, model_dim=192, head_dim=32,
                          num_gqa_groups=2, ffn_dim_divisor=64, vocab_size=1024,
                          max_context_length=256),
}
