"""MobileNetV2 (Sandler et al. 2018), CIFAR variant (stride 1 stem, fewer down-samplings)."""

from __future__ import annotations

import torch
from torch import nn

from certkd.models._registry import register_model


class ReLU6(nn.Module):
    """``min(max(x, 0), 6)`` written as ``relu(x) - relu(x - 6)``: exact, and ReLU-only for bound propagation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) - torch.relu(x - 6.0)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    return layers + [ReLU6()] if act else layers


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 project (linear), residual when shapes agree."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = _conv_bn(cin, hidden, 1, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, 1, act=False)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x) if self.residual else self.body(x)
        return out


# (expansion, channels, repeats, stride) for CIFAR-size inputs
_CIFAR_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                 (6, 160, 3, 2), (6, 320, 1, 1)]


@register_model
def mobilenet_v2(num_classes: int, input_shape: tuple[int, ...], width_mult: float = 1.0,
                 depth: int | None = None, last_channels: int = 1280) -> nn.Module:
    """MobileNetV2 with ``width_mult`` and optionally only the first ``depth`` stages."""
    config = _CIFAR_CONFIG if depth is None else _CIFAR_CONFIG[:depth]
    cin = max(8, int(32 * width_mult))
    layers: list[nn.Module] = _conv_bn(input_shape[0], cin, 3, 1)
    for t, c, n, s in config:
        cout = max(8, int(c * width_mult))
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = max(8, int(last_channels * width_mult)) if depth is None else cin * 2
    layers += _conv_bn(cin, last, 1, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)
