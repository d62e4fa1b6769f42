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

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
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


class ClampReLU(nn.Module):
    """``clamp(x, low, high)`` written with ReLUs: ``low + relu(x - low) - relu(x - high)`` (exact).

    The verification view replaces ``nn.Hardtanh``, ``nn.ReLU6`` and inline ``clamp``/``clip``
    calls by this module: auto_LiRPA 0.3 has no ``Clip`` operator, and ReLU is bounded
    soundly by every method. A missing end (``None``) drops its term:
    ``clamp(x, min=low) = low + relu(x - low)`` and ``clamp(x, max=high) = x - relu(x - high)``.

    Examples
    --------
    >>> ClampReLU(-1.0, 1.0)(torch.tensor([-3.0, 0.5, 2.0]))
    tensor([-1.0000,  0.5000,  1.0000])
    """

    def __init__(self, low: float | None, high: float | None):
        super().__init__()
        if low is None and high is None:
            raise ValueError("ClampReLU: give at least one of low and high")
        if low is not None and high is not None and low > high:
            raise ValueError("ClampReLU: low must not exceed high")
        self.low = None if low is None else float(low)
        self.high = None if high is None else float(high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.low is None else torch.relu(x - self.low) + self.low
        return out if self.high is None else out - torch.relu(x - self.high)

    def extra_repr(self) -> str:
        return f"low={self.low}, high={self.high}"


class SlopeReLU(nn.Module):
    """``leaky_relu``/``prelu`` with slope ``a`` written with a ReLU: ``a x + (1 - a) relu(x)`` (exact for any ``a``).

    For ``x > 0`` it is ``a x + (1 - a) x = x``, for ``x <= 0`` it is ``a x``. The verification
    view replaces ``nn.LeakyReLU``, ``nn.PReLU`` and inline ``F.leaky_relu``/``F.prelu`` by this
    module: every method bounds ReLU, constant products and sums soundly. ``slope`` is a number
    or one value per channel (axis 1), as ``nn.PReLU`` keeps it.

    Examples
    --------
    >>> SlopeReLU(0.1)(torch.tensor([-2.0, 3.0]))
    tensor([-0.2000,  3.0000])
    """

    slope: torch.Tensor
    rest: torch.Tensor

    def __init__(self, slope: float | torch.Tensor):
        super().__init__()
        a = torch.as_tensor(slope, dtype=torch.float32).detach().clone().flatten()
        self.register_buffer("slope", a)
        self.register_buffer("rest", 1 - a)  # precomputed: the graph holds only products, a sum and a ReLU
        self.per_channel = a.numel() > 1  # a Python bool: tracing reads no tensor value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, *([1] * (x.dim() - 2))) if self.per_channel else (1,) * x.dim()
        return self.slope.view(shape) * x + self.rest.view(shape) * torch.relu(x)

    def extra_repr(self) -> str:
        return f"slopes={self.slope.numel()}"
