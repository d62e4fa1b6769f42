"""LeNet-style MNIST CNNs of the adversarial-robustness literature, with their public key layouts.

Two layouts (the names of the parameters in their published ``state_dict``):

- ``lenet5``: advertorch's ``LeNet5`` (``advertorch.test_utils``; the PGD-trained MNIST
  model of its tutorials): flat attributes ``conv1, conv2, ... , linear1, linear2``, a
  max-pool after every convolution;
- ``small_cnn``: the TRADES / Carlini-Wagner MNIST CNN (``SmallCNN``): ``feature_extractor``
  holding ``conv1..conv4`` (max-pool after every second), ``classifier`` holding ``fc1..fc3``.

Kernel, padding, widths and pooling are arguments, so the same builders load the many
variants of these papers strictly (``certkd convert`` names every key that does not fit).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model


def _out(size: int, kernel: int, padding: int, stride: int = 1) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _feature_layers(channels: int, height: int, width: int, conv: Sequence[int], kernel: int, padding: int,
                    pool_every: int) -> tuple[list[tuple[str, nn.Module]], int]:
    """``(name, layer)`` pairs ``conv{i}, relu{i}[, maxpool{j}]`` and the flattened feature size."""
    if not conv or pool_every < 1:
        raise CertkdError("a LeNet needs at least one convolution and pool_every >= 1")
    layers: list[tuple[str, nn.Module]] = []
    cin, h, w = channels, height, width
    for i, cout in enumerate(conv, start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, int(cout), kernel, padding=padding)), (f"relu{i}", nn.ReLU())]
        cin, h, w = int(cout), _out(h, kernel, padding), _out(w, kernel, padding)
        if i % pool_every == 0:
            layers.append((f"maxpool{i // pool_every}", nn.MaxPool2d(2)))
            h, w = h // 2, w // 2
    if h < 1 or w < 1:
        raise CertkdError(f"input {height}x{width} is too small for {len(conv)} convolutions of size {kernel}")
    return layers, cin * h * w


def _dense_layers(features: int, linear: Sequence[int], num_classes: int, prefix: str, relu_start: int,
                  dropout: float = 0.0) -> list[tuple[str, nn.Module]]:
    """``{prefix}1, relu, [drop,] {prefix}2, relu, ..., {prefix}n``: hidden layers ``linear``, then the classifier.

    ReLUs are numbered from ``relu_start + 1``; a dropout (identity in eval mode) follows the first one.
    """
    layers: list[tuple[str, nn.Module]] = []
    sizes = [features, *(int(s) for s in linear), num_classes]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        layers.append((f"{prefix}{i}", nn.Linear(a, b)))
        if i < len(sizes) - 1:
            layers.append((f"relu{relu_start + i}", nn.ReLU()))
            if dropout > 0 and i == 1:
                layers.append(("drop", nn.Dropout(dropout)))
    return layers


class FlatCNN(nn.Module):
    """Layers registered as flat attributes (advertorch naming) and applied in order.

    Parameters
    ----------
    layers : list of (name, module)
        The layers in forward order; a ``nn.Flatten`` is applied before the first ``Linear``.
    """

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        super().__init__()
        self._order = [name for name, _ in layers]
        for name, layer in layers:
            self.add_module(name, layer)
        self.flatten = nn.Flatten()
        self._first_dense = next(name for name, layer in layers if isinstance(layer, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in self._order:
            if name == self._first_dense:
                x = self.flatten(x)
            x = getattr(self, name)(x)
        return x


@register_model
def lenet5(num_classes: int, input_shape: tuple[int, ...], conv: Sequence[int] = (32, 64),
           linear: Sequence[int] = (200,), kernel: int = 3, padding: int = 1, pool_every: int = 1) -> nn.Module:
    """advertorch LeNet5 layout: conv1.., linear1.. (MaxPool after each conv by default)."""
    c, h, w = input_shape
    features, size = _feature_layers(c, h, w, conv, kernel, padding, pool_every)
    # advertorch numbers the dense ReLUs after the conv ones: relu3 follows linear1 in LeNet5
    return FlatCNN(features + _dense_layers(size, linear, num_classes, "linear", relu_start=len(conv)))


@register_model
def small_cnn(num_classes: int, input_shape: tuple[int, ...], conv: Sequence[int] = (32, 32, 64, 64),
              linear: Sequence[int] = (200, 200), kernel: int = 3, padding: int = 0, pool_every: int = 2,
              dropout: float = 0.5) -> nn.Module:
    """TRADES/C&W SmallCNN layout: feature_extractor.conv1..4, classifier.fc1..3 (MaxPool every 2 convs)."""
    c, h, w = input_shape
    features, size = _feature_layers(c, h, w, conv, kernel, padding, pool_every)
    return SmallCNN(features, _dense_layers(size, linear, num_classes, "fc", 0, float(dropout)))


class SmallCNN(nn.Module):
    """``feature_extractor`` (convolutions) -> flatten -> ``classifier`` (dense layers)."""

    def __init__(self, features: list[tuple[str, nn.Module]], dense: list[tuple[str, nn.Module]]):
        super().__init__()
        self.feature_extractor = nn.Sequential(OrderedDict(features))
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(dense))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.flatten(self.feature_extractor(x)))
        return logits
