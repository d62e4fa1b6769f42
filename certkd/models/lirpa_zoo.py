"""The certified-training CNNs of the CROWN-IBP / auto_LiRPA model zoos, with their public key layouts.

- ``cnn_4layer``: auto_LiRPA's ``cnn_4layer`` (named attributes ``conv1, conv2, fc1, fc2``);
- ``cnn_7layer``: auto_LiRPA's ``cnn_7layer`` (an ``nn.Sequential``: keys ``0., 2., ..., 11., 13.``);
- ``dm_small``, ``dm_medium``, ``dm_large``: the DeepMind IBP models of Gowal et al. (2018) as
  CROWN-IBP's ``nn.Sequential`` definitions (``dm_large`` is CROWN-IBP's ``IBP_large``).

In a ``Sequential`` every layer takes an index, ReLU and Flatten included, so the indices
of the weights fix the layout: these builders place the same modules at the same indices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model

ConvSpec = tuple[int, int, int, int]
"""(out_channels, kernel, stride, padding) of one convolution."""


def _out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def sequential_cnn(input_shape: tuple[int, ...], convs: Sequence[ConvSpec], linear: Sequence[int],
                   num_classes: int, batch_norm: bool = False) -> nn.Sequential:
    """``[Conv, (BN,) ReLU] * n, Flatten, [Linear, (BN,) ReLU] * m, Linear`` as one ``nn.Sequential``.

    Parameters
    ----------
    input_shape : (C, H, W)
    convs : list of (out_channels, kernel, stride, padding)
    linear : hidden sizes of the dense layers
    num_classes : outputs of the last layer
    batch_norm : a BatchNorm after every hidden Conv/Linear (the ``_bn`` variants of the zoos)

    Returns
    -------
    nn.Sequential
        e.g. ``dm_large``: indices 0, 2, 4, 6, 8 (convs), 10 (Flatten), 11, 13 (Linear).
    """
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for cout, kernel, stride, padding in convs:
        layers.append(nn.Conv2d(c, cout, kernel, stride=stride, padding=padding))
        layers += [nn.BatchNorm2d(cout)] if batch_norm else []
        layers.append(nn.ReLU())
        c, h, w = cout, _out(h, kernel, stride, padding), _out(w, kernel, stride, padding)
    if h < 1 or w < 1:
        raise CertkdError(f"input {tuple(input_shape)} is too small for these convolutions")
    layers.append(nn.Flatten())
    size = c * h * w
    for hidden in linear:
        layers.append(nn.Linear(size, int(hidden)))
        layers += [nn.BatchNorm1d(int(hidden))] if batch_norm else []
        layers.append(nn.ReLU())
        size = int(hidden)
    layers.append(nn.Linear(size, num_classes))
    return nn.Sequential(*layers)


class CNN4Layer(nn.Module):
    """auto_LiRPA's ``cnn_4layer``: conv1 (4w, 4x4, s2) -> conv2 (8w, 4x4, s2) -> fc1 -> fc2, ReLU between."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int, linear_size: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 4 * width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4 * width, 8 * width, 4, stride=2, padding=1)
        h2, w2 = _out(_out(h, 4, 2, 1), 4, 2, 1), _out(_out(w, 4, 2, 1), 4, 2, 1)
        self.fc1 = nn.Linear(8 * width * h2 * w2, linear_size)
        self.fc2 = nn.Linear(linear_size, num_classes)
        self.relu = nn.ReLU()
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        logits: torch.Tensor = self.fc2(self.relu(self.fc1(self.flatten(x))))
        return logits


@register_model
def cnn_4layer(num_classes: int, input_shape: tuple[int, ...], width: int = 2, linear_size: int = 256) -> nn.Module:
    """auto_LiRPA cnn_4layer layout: conv1, conv2 (4x4, stride 2), fc1, fc2."""
    return CNN4Layer(input_shape, num_classes, int(width), int(linear_size))


@register_model
def cnn_7layer(num_classes: int, input_shape: tuple[int, ...], width: int = 64, linear_size: int = 512,
               batch_norm: bool = False) -> nn.Module:
    """auto_LiRPA cnn_7layer layout: Sequential of 5 3x3 convs (3rd stride 2), 2 dense layers."""
    w = int(width)
    convs = [(w, 3, 1, 1), (w, 3, 1, 1), (2 * w, 3, 2, 1), (2 * w, 3, 1, 1), (2 * w, 3, 1, 1)]
    return sequential_cnn(input_shape, convs, [int(linear_size)], num_classes, batch_norm)


@register_model
def dm_small(num_classes: int, input_shape: tuple[int, ...], padding: int = 0) -> nn.Module:
    """DM-small (Gowal et al.) as a Sequential: conv 16 4x4+2, conv 32 4x4+1, fc 100."""
    return sequential_cnn(input_shape, [(16, 4, 2, padding), (32, 4, 1, padding)], [100], num_classes)


@register_model
def dm_medium(num_classes: int, input_shape: tuple[int, ...], padding: int = 0) -> nn.Module:
    """DM-medium (Gowal et al.) as a Sequential: convs 32 3x3, 32 4x4+2, 64 3x3, 64 4x4+2; fc 512, 512."""
    convs = [(32, 3, 1, padding), (32, 4, 2, padding), (64, 3, 1, padding), (64, 4, 2, padding)]
    return sequential_cnn(input_shape, convs, [512, 512], num_classes)


@register_model
def dm_large(num_classes: int, input_shape: tuple[int, ...], linear_size: int = 512) -> nn.Module:
    """DM-large / CROWN-IBP IBP_large as a Sequential: convs 64, 64, 128 (s2), 128, 128 (3x3); fc 512."""
    convs = [(64, 3, 1, 1), (64, 3, 1, 1), (128, 3, 2, 1), (128, 3, 1, 1), (128, 3, 1, 1)]
    return sequential_cnn(input_shape, convs, [int(linear_size)], num_classes)
