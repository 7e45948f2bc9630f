"""OpenELM in PyTorch, built only from a ModelSpec, with HF apple/OpenELM tensor names.

The model knows nothing of parallelism, compilation or checkpointing; `elm_train.parallel`
applies those from outside (torchtitan's split).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from elm_spec import ElmError, ModelSpec
from elm_spec.names import ATTENTION_KINDS

AttentionBackend = Literal["sdpa", "eager", "flash"]


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as OpenELM does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with fp32 tables, grown on demand beyond `rope_max_length`."""

    def __init__(self, head_dim: int, base: float, max_length: int):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.build(max_length)

    def build(self, length: int, device: torch.device | str | None = None) -> None:
        """(Re)compute the tables for `length` positions, e.g. after loading on the meta device."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / (self.base ** exponents)
        positions = torch.arange(length, dtype=torch.float32, device=device)
        angles = torch.outer(positions, inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate x of shape [batch, seq, heads, head_dim] for positions offset..offset+seq."""
        seq_len = x.shape[1]
        if offset + seq_len > self.cos.shape[0]:
            self.build(offset + seq_len, device=x.device)
        cos = self.cos[offset: offset + seq_len, None, :]
        sin = self.sin[offset: offset + seq_len, None, :]
        xf = x.float()
        half = xf.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).type_as(x)


def _flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=True)


def flash_attention_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def check_attention_backend(backend: str) -> None:
    if backend not in ATTENTION_KINDS:
        raise ElmError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTENTION_KINDS)}")
    if backend == "flash" and not flash_attention_available():
        raise ElmError("attention backend 'flash' needs the flash-attn package and a CUDA device")


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, backend: AttentionBackend):
        super().__init__()
        self.head_dim = spec.head_dim
        self.num_q_heads = spec.num_query_heads[layer]
        self.num_kv_heads = spec.num_kv_heads[layer]
        self.backend = backend
        total_heads = self.num_q_heads + 2 * self.num_kv_heads
        self.qkv_proj = nn.Linear(spec.model_dim, total_heads * spec.head_dim, bias=False)
        if spec.normalize_qk_projections:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.out_proj = nn.Linear(self.num_q_heads * spec.head_dim, spec.model_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        qkv = self.qkv_proj(x).view(batch, seq_len, -1, self.head_dim)
        q, k, v = qkv.split([self.num_q_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope(q), rope(k)
        if self.backend == "flash":
            out = _flash_attention(q, k, v)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if self.backend == "eager":
                out = self._eager(q, k, v)
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, is_causal=True, enable_gqa=self.num_q_heads != self.num_kv_heads)
            out = out.transpose(1, 2)
        return self.out_proj(out.reshape(batch, seq_len, self.num_q_heads * self.head_dim))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vanilla attention: materialised scores, explicit mask and softmax (the study's baseline)."""
        groups = self.num_q_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        seq_len = q.shape[2]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).type_as(q)
        return weights @ v


class FeedForward(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        hidden = spec.ffn_dims[layer]
        self.glu = spec.ffn_with_glu
        self.proj_1 = nn.Linear(spec.model_dim, (2 if self.glu else 1) * hidden, bias=False)
        self.proj_2 = nn.Linear(hidden, spec.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_1(x)
        if self.glu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.silu(y)
        return self.proj_2(y)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, backend: AttentionBackend):
        super().__init__()
        self.attn_norm = RMSNorm(spec.model_dim, spec.rms_norm_eps)
        self.attn = Attention(spec, layer, backend)
        self.ffn_norm = RMSNorm(spec.model_dim, spec.rms_norm_eps)
        self.ffn = FeedForward(spec, layer)

    def forward(self, x: torch.Tensor, rope: RotaryEmbedding) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec, backend: AttentionBackend):
        super().__init__()
        self.token_embeddings = nn.Embedding(spec.vocab_size, spec.model_dim)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, backend)
                                    for i in range(spec.num_transformer_layers))
        self.norm = RMSNorm(spec.model_dim, spec.rms_norm_eps)
        self.rope = RotaryEmbedding(spec.head_dim, spec.rope_freq_constant, spec.rope_max_length)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, self.rope)
        return self.norm(x)


class OpenELM(nn.Module):
    """`model(input_ids)` returns logits [batch, seq, vocab]."""

    def __init__(self, spec: ModelSpec, attention: AttentionBackend = "sdpa"):
        super().__init__()
        check_attention_backend(attention)
        self.spec = spec
        self.transformer = Transformer(spec, attention)
        self.lm_head = (None if spec.share_input_output_layers
                        else nn.Linear(spec.model_dim, spec.vocab_size, bias=False))

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.layers

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        check_attention_backend(backend)
        for layer in self.transformer.layers:
            layer.attn.backend = backend

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids)
        if self.lm_head is None:
            return F.linear(hidden, self.transformer.token_embeddings.weight)
        return self.lm_head(hidden)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """CoreNet's initialisation (docs/reference.md section 1)."""
        spec = self.spec
        residual_std = spec.model_dim ** -0.5 * (2 * spec.num_transformer_layers) ** -0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("out_proj", "proj_2"))
                std = residual_std if is_residual else module.in_features ** -0.5
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, spec.model_dim ** -0.5, generator=generator)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
