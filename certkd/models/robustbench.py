"""RobustBench's CIFAR WideResNet and PreActResNet-18, with their public key layouts.

- ``robustbench_wrn``: the TRADES / RobustBench ``WideResNet`` (``conv1`` with 16 channels,
  ``block{1,2,3}.layer.N.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``, ``fc``): WRN-28-10,
  WRN-34-10, WRN-70-16 state_dicts of the leaderboard load strictly with ``depth``/``widen``;
- ``preact_resnet18``: RobustBench's ``PreActResNet`` (``conv1``, ``layer{1..4}.N.{bn1,conv1,bn2,
  conv2,shortcut.0}``, optional ``bn`` before ``linear``). ``shortcut_from="input"`` is its
  ``PreActBlock`` (shortcut of the block input), ``"activation"`` its ``PreActBlockV2`` (shortcut
  of ``relu(bn1(x))``, as in Rice et al. 2020, usually with ``bn_before_fc=True``).

Both end with a global average pool (``avg_pool2d(out, 8)`` / ``(out, 4)`` at 32x32 inputs).
"""

from __future__ import annotations

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model


class WRNBlock(nn.Module):
    """RobustBench ``BasicBlock``: pre-activation; the activation feeds the 1x1 shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        res: torch.Tensor = (x if self.convShortcut is None else self.convShortcut(act)) + out
        return res


class NetworkBlock(nn.Module):
    """``layer``: a Sequential of ``n`` blocks, the first one changing width and stride."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layer(x)
        return out


class RobustBenchWRN(nn.Module):
    """conv1 (16) -> block1 (16k) -> block2 (32k, s2) -> block3 (64k, s2) -> relu(bn1) -> global avg -> fc."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        logits: torch.Tensor = self.fc(self.flatten(self.pool(self.relu(self.bn1(out)))))
        return logits


@register_model
def robustbench_wrn(num_classes: int, input_shape: tuple[int, ...], depth: int = 28, widen: int = 10) -> nn.Module:
    """RobustBench/TRADES WideResNet layout: conv1 (16 ch), block1..3.layer.N (convShortcut), bn1, fc."""
    if depth < 10 or (depth - 4) % 6:
        raise CertkdError(f"robustbench_wrn depth must be 6n + 4 with n >= 1, got {depth}")
    return RobustBenchWRN(int(depth), int(widen), num_classes, input_shape[0])


class PreActBlock(nn.Module):
    """RobustBench ``PreActBlock`` / ``PreActBlockV2``: BN-ReLU-conv-BN-ReLU-conv plus ``shortcut.0`` (1x1)."""

    def __init__(self, cin: int, cout: int, stride: int, from_activation: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.from_activation = from_activation
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu(self.bn1(x))
        if hasattr(self, "shortcut"):
            short = self.shortcut(act if self.from_activation else x)
        else:
            short = x
        out: torch.Tensor = self.conv2(self.relu(self.bn2(self.conv1(act)))) + short
        return out


class RobustBenchPreActResNet(nn.Module):
    """conv1 (64) -> layer1..4 (64, 128, 256, 512; 2 blocks each) -> [relu(bn)] -> global avg -> linear."""

    def __init__(self, num_classes: int, in_channels: int, from_activation: bool, bn_before_fc: bool,
                 width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        cin, stages = width, []
        for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(PreActBlock(cin, planes, stride, from_activation),
                                        PreActBlock(planes, planes, 1, from_activation)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin) if bn_before_fc else None
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn is not None:
            out = self.relu(self.bn(out))
        logits: torch.Tensor = self.linear(self.flatten(self.pool(out)))
        return logits


@register_model
def preact_resnet18(num_classes: int, input_shape: tuple[int, ...], shortcut_from: str = "input",
                    bn_before_fc: bool = False, width: int = 64) -> nn.Module:
    """RobustBench PreActResNet-18 layout: conv1, layer1..4.N (shortcut.0), [bn], linear."""
    if shortcut_from not in ("input", "activation"):
        raise CertkdError(f"shortcut_from must be 'input' or 'activation', got {shortcut_from!r}")
    return RobustBenchPreActResNet(num_classes, input_shape[0], shortcut_from == "activation", bool(bn_before_fc),
                                   int(width))
