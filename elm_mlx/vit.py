"""CoreNet's Vision Transformer in MLX: the twin of elm_train.catlip.vit, same tensor names.

Inputs are NHWC (MLX's convolution layout): `model(images)` with images [batch, H, W, 3] at
the spec's image size returns logits [batch, num_classes]. BatchNorm runs on its stored
statistics (inference only).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from elm_spec import ElmError
from elm_spec.vit import ViTSpec


class ConvStem(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        k0, k1, k2 = spec.stem_strides
        dim = spec.stem_dim
        self.conv1 = nn.Conv2d(3, dim, k0, stride=k0, bias=False)
        self.norm1 = nn.BatchNorm(dim)
        self.conv2 = nn.Conv2d(dim, dim, k1, stride=k1, bias=False)
        self.norm2 = nn.BatchNorm(dim)
        self.conv3 = nn.Conv2d(dim, spec.embed_dim, k2, stride=k2, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        x = nn.gelu(self.norm1(self.conv1(x)))
        x = nn.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.attn = Attention(spec.embed_dim, spec.num_heads)
        self.norm2 = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.mlp = MLP(spec.embed_dim, spec.ffn_dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.stem = ConvStem(spec)
        self.pos_embed = mx.zeros((1, spec.grid_size ** 2, spec.embed_dim))
        self.cls_token = mx.zeros((1, 1, spec.embed_dim))
        self.blocks = [Block(spec) for _ in range(spec.num_layers)]
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.head = nn.Linear(spec.embed_dim, spec.num_classes)

    def features(self, images: mx.array) -> mx.array:
        size = self.spec.image_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise ElmError(f"expected images [batch, {size}, {size}, 3], got {list(images.shape)}")
        x = self.stem(images)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos_embed
        cls = mx.broadcast_to(self.cls_token, (x.shape[0], 1, x.shape[-1]))
        x = mx.concatenate([cls, x], axis=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def __call__(self, images: mx.array) -> mx.array:
        return self.head(self.features(images))
