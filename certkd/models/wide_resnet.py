"""Wide ResNets WRN-depth-width (Zagoruyko & Komodakis 2016), pre-activation blocks."""

from torch import nn

from certkd.errors import CertkdError
from certkd.models._registry import register_model
from certkd.models.resnet import PreActResNet


@register_model
def wide_resnet(num_classes: int, input_shape: tuple[int, ...], depth: int = 16, widen: int = 4) -> nn.Module:
    """WRN-depth-widen: 3 stages of (depth - 4) / 6 blocks, widths 16k, 32k, 64k."""
    if (depth - 4) % 6:
        raise CertkdError(f"wide_resnet depth must be 6n + 4, got {depth}")
    n = (depth - 4) // 6
    return PreActResNet([n] * 3, [16 * widen, 32 * widen, 64 * widen], num_classes, input_shape[0])
