"""CoreNet's Vision Transformer in PyTorch, built from a ViTSpec (elm_spec.vit), SDPA attention.

`model(images)` with images [batch, 3, H, W] returns logits [batch, num_classes];
`model.features(images)` the class-token embedding [batch, embed_dim]. As in torchtitan, the
model knows nothing of parallelism: DDP/FSDP wrap it from outside (each `blocks[i]` is a unit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from elm_spec.vit import ViTSpec


class ConvStem(nn.Module):
    """Three convolutions (the first two with BatchNorm + GELU) whose strides make the patch."""

    def __init__(self, spec: ViTSpec):
        super().__init__()
        k0, k1, k2 = spec.stem_strides
        dim = spec.stem_dim
        self.conv1 = nn.Conv2d(3, dim, k0, stride=k0, bias=False)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, k1, stride=k1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim)
        self.conv3 = nn.Conv2d(dim, spec.embed_dim, k2, stride=k2, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.conv1(x)))
        x = F.gelu(self.norm2(self.conv2(x)))
        return self.conv3(x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `causal` masks attention (the CLIP text tower uses this)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, ffn_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), causal=self.causal)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, spec: ViTSpec):
        super().__init__()
        self.spec = spec
        self.stem = ConvStem(spec)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.grid_size ** 2, spec.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim))
        self.blocks = nn.ModuleList(Block(spec.embed_dim, spec.num_heads, spec.ffn_dim, spec.norm_eps)
                                    for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(spec.embed_dim, eps=spec.norm_eps)
        self.head = nn.Linear(spec.embed_dim, spec.num_classes)

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks: the units FSDP shards and activation checkpointing wraps."""
        return self.blocks

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The learned grid, bilinearly resized when the input is not image_size (CoreNet)."""
        grid = self.spec.grid_size
        if (grid_h, grid_w) == (grid, grid):
            return self.pos_embed
        table = self.pos_embed.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = x + self.position_embedding(grid_h, grid_w).to(x.dtype)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """CoreNet's CatLIP initialisation (see init_transformer_weights)."""
        init_transformer_weights(self, generator)
        nn.init.trunc_normal_(self.cls_token, std=0.02, generator=generator)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, generator=generator)


@torch.no_grad()
def init_transformer_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Linear layers truncated normal (std 0.02) with zero bias, convolutions Kaiming normal,
    norms reset: CoreNet's `linear_init: trunc_normal`, `conv_init: kaiming_normal`."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu",
                                    generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.02, generator=generator)


def build_vit(spec: ViTSpec, seed: int = 0) -> VisionTransformer:
    model = VisionTransformer(spec)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model
