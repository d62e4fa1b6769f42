"""Layers shared by the model registry and the verification view."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel input normalization ``(x - mean) / std`` (theory.md §1).

    Every certkd model carries this as its first layer so that inputs live in
    ``[0, 1]^d`` and radii are in pixel units. ``bounds.view`` rewrites it as an
    exactly equivalent dense affine layer before bound propagation.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.shape != std_t.shape:
            raise ValueError("Normalize: mean and std must have the same length")
        if not bool((std_t > 0).all()):
            raise ValueError("Normalize: std must be positive")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def _shape(self, x: torch.Tensor) -> tuple[int, ...]:
        # channel axis is 1 for images (B, C, H, W); features are axis 1 for (B, D)
        return (1, -1) + (1,) * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._shape(x)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.mean.numel()}"
