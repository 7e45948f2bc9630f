"""The CLIP baseline: the same ViT as the image tower, CoreNet's CLIP text transformer, and the
symmetric contrastive loss with features gathered across ranks.

Text tower (CoreNet projects/range_augment/clip/clip_vit_base.yaml): vocabulary 49408,
context 77, width 512, 12 causal pre-norm layers of 8 heads, MLP 4x, embeddings scaled by
width^-0.5, learned positions, final LayerNorm, the feature at each text's last token,
projections of both towers to 512 dimensions, a learned temperature (init 1/0.07, capped at
100).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elm_spec.vit import ViTSpec, transformer_block_macs
from elm_train.catlip.vit import Block, VisionTransformer, init_transformer_weights

PAD_ID = 0


@dataclass(frozen=True)
class TextSpec:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    num_layers: int = 12
    num_heads: int = 8
    ffn_multiplier: float = 4.0
    projection_dim: int = 512

    def flops_per_text(self) -> float:
        """Training FLOPs per text (3x forward; matmuls only): every block runs over the whole
        padded context, attention counted in full as for the image tower."""
        block = transformer_block_macs(self.context_length, self.width,
                                       int(self.width * self.ffn_multiplier))
        return 3.0 * 2 * self.num_layers * block


class TextTransformer(nn.Module):
    def __init__(self, spec: TextSpec):
        super().__init__()
        self.spec = spec
        self.token_embedding = nn.Embedding(spec.vocab_size, spec.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, spec.context_length, spec.width))
        ffn = int(spec.width * spec.ffn_multiplier)
        self.blocks = nn.ModuleList(Block(spec.width, spec.num_heads, ffn, 1e-6, causal=True)
                                    for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(spec.width, eps=1e-6)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [batch, length] (PAD_ID after the text) -> features [batch, width]."""
        x = self.token_embedding(tokens) * self.spec.width ** -0.5
        x = x + self.pos_embed[:, : tokens.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        last = (tokens != PAD_ID).sum(dim=1).clamp(min=1) - 1
        return x[torch.arange(x.shape[0], device=x.device), last]


class CLIP(nn.Module):
    """`model(images, text)` -> (image features, text features, logit scale); features are
    L2-normalised projections."""

    def __init__(self, vit: ViTSpec, text: TextSpec):
        super().__init__()
        self.image_encoder = VisionTransformer(vit.replace(num_classes=1))
        self.image_encoder.head = nn.Identity()
        self.text_encoder = TextTransformer(text)
        self.image_projection = nn.Linear(vit.embed_dim, text.projection_dim, bias=False)
        self.text_projection = nn.Linear(text.width, text.projection_dim, bias=False)
        # shape [1], not a scalar: FSDP2 cannot shard 0-d parameters
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))

    @property
    def layers(self) -> list[nn.Module]:
        """Both towers' blocks: the units FSDP shards and activation checkpointing wraps."""
        return [*self.image_encoder.blocks, *self.text_encoder.blocks]

    def forward(self, images: torch.Tensor, text: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.image_projection(self.image_encoder.features(images)), dim=-1)
        text_features = F.normalize(self.text_projection(self.text_encoder(text)), dim=-1)
        return image_features, text_features, self.logit_scale.clamp(max=math.log(100)).exp()[0]

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        self.image_encoder.init_weights(generator)
        init_transformer_weights(self.text_encoder, generator)
        nn.init.trunc_normal_(self.text_encoder.pos_embed, std=0.01, generator=generator)
        for projection in (self.image_projection, self.text_projection):
            nn.init.normal_(projection.weight, std=projection.in_features ** -0.5, generator=generator)
        self.logit_scale.fill_(math.log(1 / 0.07))


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' features concatenated (gradients flow back to each owner), and this rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features), dim=0), dist.get_rank()


def contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against every rank's columns (open_clip's local
    loss with gathered features); averaging it over ranks gives the full-batch loss."""
    all_images, rank = gather_with_grad(image_features)
    all_texts, _ = gather_with_grad(text_features)
    batch = image_features.shape[0]
    targets = torch.arange(batch, device=image_features.device) + rank * batch
    logits_per_image = logit_scale * image_features.float() @ all_texts.float().T
    logits_per_text = logit_scale * text_features.float() @ all_images.float().T
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
