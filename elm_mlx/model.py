"""OpenELM in MLX, built from the same ModelSpec as the PyTorch twin.

Follows mlx-lm's model protocol (`layers`, `model(inputs, cache=...)`), so mlx-lm's KV caches,
samplers, `stream_generate` and LoRA layers drive it unchanged. Module and tensor names match
HF apple/OpenELM, which is also what mlx-lm's own `openelm` model loads.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from elm_spec import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.head_dim = spec.head_dim
        self.n_heads = spec.num_query_heads[layer]
        self.n_kv_heads = spec.num_kv_heads[layer]
        self.scale = spec.head_dim ** -0.5
        total_heads = self.n_heads + 2 * self.n_kv_heads
        self.qkv_proj = nn.Linear(spec.model_dim, total_heads * spec.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * spec.head_dim, spec.model_dim, bias=False)
        self.normalize_qk = spec.normalize_qk_projections
        if self.normalize_qk:
            self.q_norm = nn.RMSNorm(spec.head_dim, eps=spec.rms_norm_eps)
            self.k_norm = nn.RMSNorm(spec.head_dim, eps=spec.rms_norm_eps)
        self.rope = nn.RoPE(spec.head_dim, traditional=False, base=spec.rope_freq_constant)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        batch, length, _ = x.shape
        qkv = self.qkv_proj(x).reshape(batch, length, -1, self.head_dim).transpose(0, 2, 1, 3)
        queries, keys, values = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if self.normalize_qk:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        output = scaled_dot_product_attention(queries, keys, values, cache=cache,
                                              scale=self.scale, mask=mask)
        return self.out_proj(output.transpose(0, 2, 1, 3).reshape(batch, length, -1))


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        hidden = spec.ffn_dims[layer]
        self.glu = spec.ffn_with_glu
        self.proj_1 = nn.Linear(spec.model_dim, (2 if self.glu else 1) * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, spec.model_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.proj_1(x)
        if self.glu:
            gate, up = mx.split(y, 2, axis=-1)
            return self.proj_2(nn.silu(gate) * up)
        return self.proj_2(nn.silu(y))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(spec.model_dim, eps=spec.rms_norm_eps)
        self.attn = Attention(spec, layer)
        self.ffn_norm = nn.RMSNorm(spec.model_dim, eps=spec.rms_norm_eps)
        self.ffn = FeedForward(spec, layer)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.token_embeddings = nn.Embedding(spec.vocab_size, spec.model_dim)
        self.layers = [DecoderLayer(spec, i) for i in range(spec.num_transformer_layers)]
        self.norm = nn.RMSNorm(spec.model_dim, eps=spec.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache: Any = None, mask: Any = None) -> mx.array:
        h = self.token_embeddings(inputs)
        caches = cache if cache is not None else [None] * len(self.layers)
        if mask is None:
            mask = create_attention_mask(h, caches[0])
        for layer, layer_cache in zip(self.layers, caches, strict=True):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """`model(ids)` returns logits [batch, seq, vocab]; `mask` may be any attention mask
    (for example block-diagonal for packed sequences)."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model_type = "openelm"
        self.transformer = Transformer(spec)
        if not spec.share_input_output_layers:
            self.lm_head = nn.Linear(spec.model_dim, spec.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache: Any = None, mask: Any = None) -> mx.array:
        return self.project(self.transformer(inputs, cache, mask))

    def project(self, hidden: mx.array) -> mx.array:
        """Hidden states to vocabulary logits."""
        if self.spec.share_input_output_layers:
            return self.transformer.token_embeddings.as_linear(hidden)
        return self.lm_head(hidden)

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.transformer.layers

    @property
    def args(self) -> ModelSpec:
        return self.spec
