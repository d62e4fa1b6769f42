"""A feed-forward chain described by data: the architecture of models read from ONNX files.

``layer_chain(layers=[...])`` builds ``nn.Sequential`` from a list of JSON-able layer
descriptions, so a checkpoint of an imported network holds only its description and
its weights (loaded with ``weights_only=True``), never code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model


class InputAffine(nn.Module):
    """The exact elementwise map ``x -> shift + scale * x`` (scale, shift: tensors broadcast against one example).

    The first layer of an imported model whose inputs range over ``[lo, hi]`` instead of
    ``[0, 1]``: ``scale = hi - lo``, ``shift = lo``, so certkd's unit box is the model's box.
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(tuple(int(s) for s in shape)))
        self.register_buffer("shift", torch.zeros(tuple(int(s) for s in shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the explicit batch axis on the constants: auto_LiRPA 0.3 mis-shapes CROWN's products without it
        return x * self.scale.unsqueeze(0) + self.shift.unsqueeze(0)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scale.shape)}"


class Reshape(nn.Module):
    """``x.reshape(batch, *shape)``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _tuple2(value: Any) -> tuple[int, int]:
    v = [int(s) for s in (value if isinstance(value, (list, tuple)) else [value, value])]
    return v[0], v[1]


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """One layer from its description ``{"type": ..., **arguments}`` (see ``LAYER_TYPES``)."""
    kind = spec.get("type")
    a = {k: v for k, v in spec.items() if k != "type"}
    if kind == "linear":
        return nn.Linear(int(a["in_features"]), int(a["out_features"]), bias=bool(a.get("bias", True)))
    if kind == "conv2d":
        return nn.Conv2d(int(a["in_channels"]), int(a["out_channels"]), _tuple2(a["kernel_size"]),
                         stride=_tuple2(a.get("stride", 1)), padding=_tuple2(a.get("padding", 0)),
                         dilation=_tuple2(a.get("dilation", 1)), groups=int(a.get("groups", 1)),
                         bias=bool(a.get("bias", True)))
    if kind == "batchnorm2d":
        return nn.BatchNorm2d(int(a["num_features"]), eps=float(a.get("eps", 1e-5)))
    if kind == "batchnorm1d":
        return nn.BatchNorm1d(int(a["num_features"]), eps=float(a.get("eps", 1e-5)))
    if kind == "maxpool2d":
        return nn.MaxPool2d(_tuple2(a["kernel_size"]), stride=_tuple2(a.get("stride", a["kernel_size"])),
                            padding=_tuple2(a.get("padding", 0)))
    if kind == "avgpool2d":
        return nn.AvgPool2d(_tuple2(a["kernel_size"]), stride=_tuple2(a.get("stride", a["kernel_size"])),
                            padding=_tuple2(a.get("padding", 0)))
    if kind == "affine":
        return InputAffine(a["shape"])
    if kind == "reshape":
        return Reshape(a["shape"])
    if kind in _PLAIN:
        return _PLAIN[kind]()
    raise CertkdError(f"unknown layer type {kind!r} in a layer chain: use one of {', '.join(LAYER_TYPES)}")


_PLAIN: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "flatten": nn.Flatten}
LAYER_TYPES = ("linear", "conv2d", "batchnorm1d", "batchnorm2d", "maxpool2d", "avgpool2d", "affine", "reshape",
               *_PLAIN)


@register_model
def layer_chain(num_classes: int, input_shape: tuple[int, ...], layers: Sequence[dict[str, Any]] = ()) -> nn.Module:
    """A chain of layers given as data (ONNX imports): [{"type": "linear", "in_features": ...}, ...]."""
    if not layers:
        raise CertkdError("layer_chain needs a non-empty list of layers")
    model = nn.Sequential(*(build_layer(dict(spec)) for spec in layers))
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, *input_shape))
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise CertkdError(f"the layer chain maps {tuple(input_shape)} inputs to {tuple(out.shape[1:])} outputs, "
                          f"not {num_classes}")
    return model
