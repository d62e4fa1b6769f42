"""A small Vision Transformer (Dosovitskiy et al. 2021) for 8x8 to 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + MHA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        out: torch.Tensor = x + self.mlp(self.norm2(x))
        return out


class ViT(nn.Module):
    def __init__(self, num_classes: int, input_shape: tuple[int, ...], patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float):
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise CertkdError(f"vit patch size {patch} must divide the input size {h}x{w}")
        self.patch_embed = nn.Conv2d(c, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (h // patch) * (w // patch) + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        logits: torch.Tensor = self.head(self.norm(self.blocks(tokens))[:, 0])
        return logits


@register_model
def vit(num_classes: int, input_shape: tuple[int, ...], patch: int | None = None, dim: int = 64, depth: int = 4,
        heads: int = 4, mlp_ratio: float = 2.0) -> nn.Module:
    """ViT with a patch-embedding conv, a class token, learned positions and pre-norm blocks."""
    patch = patch or (2 if input_shape[1] <= 8 else 4)
    return ViT(num_classes, input_shape, patch, dim, depth, heads, mlp_ratio)
