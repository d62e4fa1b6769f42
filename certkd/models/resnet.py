"""CIFAR-style pre-activation ResNets (He et al. 2016) with BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from certkd.models._registry import register_model


class PreActBlock(nn.Module):
    """BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3, plus a (1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(x))
        short = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        res: torch.Tensor = self.conv2(self.relu2(self.bn2(out))) + short
        return res


class PreActResNet(nn.Module):
    def __init__(self, blocks: list[int], widths: list[int], num_classes: int, in_channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        layers: list[nn.Module] = []
        cin = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(PreActBlock(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.layers(self.stem(x))))
        logits: torch.Tensor = self.fc(self.flatten(self.pool(out)))
        return logits


@register_model
def resnet18(num_classes: int, input_shape: tuple[int, ...], width: int = 64) -> nn.Module:
    """Pre-activation ResNet-18: 4 stages of 2 blocks, widths w, 2w, 4w, 8w."""
    return PreActResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], num_classes, input_shape[0])


@register_model
def resnet_small(num_classes: int, input_shape: tuple[int, ...], width: int = 16) -> nn.Module:
    """A small pre-activation ResNet: 2 stages of 1 block (widths w, 2w)."""
    return PreActResNet([1, 1], [width, 2 * width], num_classes, input_shape[0])
