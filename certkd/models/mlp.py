"""Fully connected ReLU networks."""

from torch import nn

from certkd.models._registry import register_model


@register_model
def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: tuple[int, ...] | list[int] = (256, 256)) -> nn.Module:
    """Flatten -> [Linear -> ReLU] * len(hidden) -> Linear."""
    d = 1
    for s in input_shape:
        d *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU()]
        d = int(h)
    layers.append(nn.Linear(d, num_classes))
    return nn.Sequential(*layers)
